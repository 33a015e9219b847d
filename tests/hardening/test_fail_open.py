"""A bug inside the fault engine fails open: the query is forwarded
unchanged (or the answer passed through), the error is logged and counted,
and the proxy keeps serving.

In process: a real `Server` (UDP/TCP listeners on free ports, the session's
unbound as upstream) whose engine holds an ad hoc rule; the rule's fault,
a selector or the engine itself is monkeypatched to raise."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import dns.rcode
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.core.model import Rule
from proxy.core.selectors import Selector
from proxy.server import Server
from support import zone
from support.dnsutil import addresses, make_query, tcp, udp


class Boom(RuntimeError):
    pass


def boom(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected bug")


async def _server(unbound, rule_spec: dict | None) -> tuple[Server, Engine]:
    engine = Engine()
    if rule_spec is not None:
        engine.add_rule("buggy", Rule.model_validate({"name": "buggy", **rule_spec}), time.time())
    settings = Settings(listen=["127.0.0.1:0"], upstreams=[unbound.hostport], admin=None,
                        log_level="info")
    server = Server(settings, engine)
    await server.start()
    return server, engine


def _addr(server: Server) -> tuple[str, int]:
    host, port = server.listen_addresses[0].rsplit(":", 1)
    return host, int(port)


async def _ask(server: Server, name: str = zone.WWW, transport: str = "udp"):
    host, port = _addr(server)
    send = udp if transport == "udp" else tcp
    return await asyncio.to_thread(send, make_query(name, "A"), host, port, timeout=3)


def _metric(server: Server, name: str) -> float:
    text = generate_latest(server.registry).decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def _rule(engine: Engine):
    (rule,) = engine.rules()
    return rule


def _real(reply) -> bool:
    return reply.rcode() == dns.rcode.NOERROR and addresses(reply) == set(zone.WWW_A)


@pytest.fixture
async def stop_servers():
    servers: list[Server] = []
    yield servers
    for server in servers:
        await server.stop()


# --- a fault raises ------------------------------------------------------------------


async def test_fault_apply_raising_forwards_the_query_unchanged(unbound, stop_servers,
                                                                monkeypatch):
    server, engine = await _server(unbound, {"match": {"suffix": "example.test"},
                                             "fault": "nxdomain"})
    stop_servers.append(server)
    rule = _rule(engine)
    monkeypatch.setattr(rule.fault, "apply", boom)
    for transport in ("udp", "tcp", "udp"):
        assert _real(await _ask(server, transport=transport))
    assert rule.counters.matched == 3
    assert rule.counters.errors == 3
    assert rule.counters.injected == 0
    # and it keeps serving, fault or no fault
    monkeypatch.undo()
    reply = await _ask(server)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert rule.counters.errors == 3


async def test_response_fault_raising_passes_the_answer_through(unbound, stop_servers,
                                                                monkeypatch):
    server, engine = await _server(unbound, {"match": {"suffix": "example.test"},
                                             "fault": {"type": "ttl", "set": 7}})
    stop_servers.append(server)
    rule = _rule(engine)
    monkeypatch.setattr(rule.fault, "respond", boom)
    reply = await _ask(server)
    assert _real(reply)
    assert all(rrset.ttl != 7 for rrset in reply.answer)  # the real answer, untouched
    assert rule.counters.errors == 1
    monkeypatch.undo()
    reply = await _ask(server)
    assert all(rrset.ttl == 7 for rrset in reply.answer)


async def test_selector_raising_forwards_unchanged(unbound, stop_servers, monkeypatch):
    server, engine = await _server(unbound, {"match": {"suffix": "example.test"},
                                             "fault": "servfail"})
    stop_servers.append(server)
    monkeypatch.setattr(Selector, "matches", boom)
    for _ in range(3):
        assert _real(await _ask(server))
    assert engine.errors == 3


# --- the engine itself raises: caught by the forwarder, logged, in /metrics ------------


@pytest.mark.parametrize("hook", ["on_query", "on_response"])
async def test_engine_raising_is_logged_counted_and_forwarded(unbound, stop_servers,
                                                              monkeypatch, caplog, hook):
    caplog.set_level(logging.INFO)
    server, engine = await _server(unbound, {"match": {"suffix": "example.test"},
                                             "fault": {"type": "ttl", "set": 7}})
    stop_servers.append(server)
    before = _metric(server, "dnschaos_engine_errors_total")
    monkeypatch.setattr(engine, hook, boom)
    for transport in ("udp", "tcp"):
        assert _real(await _ask(server, transport=transport))
    assert _metric(server, "dnschaos_engine_errors_total") - before == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and r.name.startswith("dnschaos") and r.exc_info
              and isinstance(r.exc_info[1], Boom)]
    assert len(errors) == 2
    monkeypatch.undo()
    for _ in range(5):  # still up and faulting as configured
        reply = await _ask(server)
        assert all(rrset.ttl == 7 for rrset in reply.answer)


# --- logged and counted ---------------------------------------------------------------


async def _broken(unbound, stop_servers, monkeypatch, where: str):
    """A server whose rule's `apply` or `respond`, or every selector, raises."""
    fault = {"type": "ttl", "set": 7} if where == "respond" else "nxdomain"
    server, engine = await _server(unbound, {"match": {"suffix": "example.test"},
                                             "fault": fault})
    stop_servers.append(server)
    if where == "selector":
        monkeypatch.setattr(Selector, "matches", boom)
    else:
        monkeypatch.setattr(_rule(engine).fault, where, boom)
    return server


@pytest.mark.parametrize("where", ["apply", "respond", "selector"])
async def test_a_fault_error_is_logged(unbound, stop_servers, monkeypatch, caplog, where):
    caplog.set_level(logging.DEBUG)
    server = await _broken(unbound, stop_servers, monkeypatch, where)
    assert _real(await _ask(server))
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.exc_info and isinstance(r.exc_info[1], Boom)]
    assert logged, "the fault's exception was not logged"


@pytest.mark.parametrize("where", ["apply", "respond", "selector"])
async def test_a_fault_error_is_in_metrics(unbound, stop_servers, monkeypatch, where):
    server = await _broken(unbound, stop_servers, monkeypatch, where)
    assert _real(await _ask(server))
    text = generate_latest(server.registry).decode()
    counted = _metric(server, "dnschaos_engine_errors_total") + sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name.startswith("dnschaos_rule_errors"))
    assert counted >= 1, "no metric counts the fault's exception"
