"""`dnschaos demo`: watch a fault happen end to end, with no network.

It starts a tiny authoritative server for the zone `demo.test` on
loopback (the "real" upstream), the proxy in front of it, and a client that
asks for three names while a short scenario moves through its phases.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord

from proxy.config import Settings
from proxy.core.model import Scenario
from proxy.runtime import run_event_loop, setup_logging
from proxy.server import Server

ZONE = """
shop.demo.test. 300 IN A 198.51.100.10
api.demo.test.  300 IN A 198.51.100.20
db.demo.test.   300 IN A 198.51.100.30
"""
NAMES = ["shop.demo.test", "api.demo.test", "db.demo.test"]

SCENARIO = {
    "name": "demo",
    "description": "A short game day on the demo zone.",
    "seed": 7,
    "phases": [
        {"name": "baseline", "duration": "2s"},
        {"name": "api-gone", "duration": "3s",
         "rules": [{"name": "api-nxdomain", "match": {"name": "api.demo.test"},
                    "fault": "nxdomain"}]},
        {"name": "db-brownout", "duration": "3s",
         "rules": [{"name": "db-slow-servfail", "match": {"name": "db.demo.test"},
                    "fault": {"type": "delay", "delay": "300ms", "then": "servfail"}},
                   {"name": "shop-empty", "match": {"name": "shop.demo.test", "probability": 0.5},
                    "fault": "nodata"}]},
        {"name": "recovered", "duration": "2s"},
    ],
}


class ZoneServer(asyncio.DatagramProtocol):
    """A minimal authoritative server: answers from a fixed zone, NXDOMAIN otherwise."""

    def __init__(self, zone: str) -> None:
        self.records = RR.fromZone(zone)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return
        reply = query.reply()
        qname, qtype = query.q.qname, query.q.qtype
        matches = [rr for rr in self.records if rr.rname == qname]
        reply.rr = [rr for rr in matches if rr.rtype == qtype or qtype == QTYPE.ANY]
        if not matches:
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)


async def _ask(port: int, name: str) -> str:
    """One query over UDP; a line saying what the client saw and how fast."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answer.done():
                answer.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        Client, remote_addr=("127.0.0.1", port))
    query = DNSRecord.question(name)
    query.header.id = random.randrange(65536)
    start = time.monotonic()
    try:
        transport.sendto(query.pack())
        data = await asyncio.wait_for(answer, 2.0)
    except TimeoutError:
        return "no answer (timeout)"
    finally:
        transport.close()
    ms = (time.monotonic() - start) * 1000
    reply = DNSRecord.parse(data)
    rcode = RCODE.get(reply.header.rcode)
    answers = " ".join(str(rr.rdata) for rr in reply.rr) or "(empty)"
    return f"{rcode:<8} {answers:<16} {ms:6.0f} ms"


async def _demo(interval: float) -> None:
    loop = asyncio.get_running_loop()
    upstream, _ = await loop.create_datagram_endpoint(
        lambda: ZoneServer(ZONE), local_addr=("127.0.0.1", 0))
    upstream_port = upstream.get_extra_info("sockname")[1]
    settings = Settings(listen=["127.0.0.1:0"], upstreams=[f"127.0.0.1:{upstream_port}"],
                        admin=None, log_level="warning")
    server = Server(settings)
    await server.start()
    port = int(server.listen_addresses[0].rsplit(":", 1)[1])
    scenario = Scenario.model_validate(SCENARIO)
    print(f"upstream zone demo.test on 127.0.0.1:{upstream_port}; "
          f"proxy on {server.listen_addresses[0]}")
    print(f"scenario {scenario.name!r}: "
          + " -> ".join(f"{p.name} ({p.duration:g}s)" for p in scenario.phases) + "\n")
    # The same game-day manager as `dnschaos run --scenario`: it ends the run
    # at its last phase and keeps its final counts.
    gameday = server.gameday
    run = gameday.start(scenario, trigger="demo").id
    try:
        shown = None
        while (phase := _phase(server, run)) is not None:
            if phase != shown:
                shown = phase
                print(f"--- phase {shown}")
            for name in NAMES:
                print(f"  {name:<16} {await _ask(port, name)}")
            await asyncio.sleep(interval)
        while run not in gameday.ended:  # the manager's next tick ends it
            await asyncio.sleep(0.02)
        print("--- scenario over: everything reverted")
        for name in NAMES:
            print(f"  {name:<16} {await _ask(port, name)}")
        print("\nPer rule: queries matched / faults injected")
        for row in gameday.ended[run].stats:
            print(f"  {row['phase'] + '/' + row['rule']:<30} {row['fault']:<9} "
                  f"{row['matched']:>3} / {row['injected']}")
    finally:
        await server.stop()
        upstream.close()


def _phase(server: Server, run: str) -> str | None:
    """The name of the run's phase in force now; None once it is over."""
    for row in server.engine.runs_info(time.time()):
        if row["run"] == run:
            return row["phase"] if row["state"] == "running" else None
    return None


def run_demo(interval: float = 0.7) -> int:
    setup_logging("warning")
    run_event_loop(_demo(interval), use_uvloop=os.environ.get("DNSCHAOS_NO_UVLOOP") is None)
    return 0
