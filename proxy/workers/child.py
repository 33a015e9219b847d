"""The worker process (`python -m proxy.workers --control-fd FD`): a
Forwarder and a replica Engine behind listening sockets its main process
bound for it (SO_REUSEPORT; handed over as file descriptors).

It reads the init message (settings, its index, its sockets, a snapshot of
the replicated log), restores the snapshot, starts reading its sockets, says "ready",
then handles control messages as they arrive, in order: log entries
(applied, then acknowledged by sequence number; ticks are covered by the
next acknowledgement), requests (release held queries, probe for loops,
counts), and "drain".  It exits when the main process dies
(PR_SET_PDEATHSIG, and end of file on its control channel)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.errors import ListenError
from proxy.forwarder import Forwarder
from proxy.listeners import Listeners
from proxy.runtime import run_event_loop
from proxy.workers.ipc import frame, read_init, unframe
from proxy.workers.merge import forwarder_snapshot
from proxy.workers.replication import Replica

log = logging.getLogger("dnschaos.worker")


class _Control(asyncio.Protocol):
    """The worker's end of the control channel."""

    def __init__(self, worker: Worker, early: bytearray) -> None:
        self.worker = worker
        self.buffer = early  # what came with the init message: handled first
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for message in unframe(self.buffer):
            self.worker.handle(message)

    def send(self, message: Any) -> None:
        if message[0] == "reply" and not message[1]:
            return  # seq 0: no reply wanted
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.worker.on_main_gone()


class Worker:
    def __init__(self, sock: socket.socket, init: dict[str, Any],
                 rest: bytearray | None = None) -> None:
        self.sock = sock
        self.rest = rest or bytearray()
        self.settings: Settings = init["settings"]
        self.index: int = init["index"]
        self.loop_token: str | None = init.get("loop_token")
        self.bound = ([socket.socket(fileno=fd) for fd in init["listen_fds"]]
                      if init.get("listen_fds") else None)
        """The listening sockets the main process bound for this worker at
        start; None (a restart): it binds its own, beside the other workers'."""
        self.engine = Engine()
        self.replica = Replica(self.engine, self.index, init["count"])
        self.replica.restore(init["snapshot"])
        self.forwarder = Forwarder(self.settings, self.engine, loop_token=self.loop_token)
        self.listeners = Listeners(self.forwarder)
        self.control: _Control | None = None
        self.stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        await self.forwarder.start()
        # The control is set by the factory, not after the await: a message
        # already waiting in the socket is delivered before the await returns.
        await loop.create_unix_connection(self._control, sock=self.sock)
        assert self.control is not None
        try:
            await self.listeners.start(self.settings.listen, bound=self.bound, reuse_port=True)
        except ListenError as exc:
            self.control.send(("failed", str(exc)))
            await asyncio.sleep(0.1)
            await self.forwarder.stop()
            return 1
        self.forwarder.start_loop_probes()
        gc.freeze()  # as in Server.start: long-lived objects out of the collector's way
        self.control.send(("applied", self.replica.applied))
        self.control.send(("ready", {"pid": os.getpid(), "listen": list(self.settings.listen)}))
        await self.stop.wait()
        await self.listeners.drain(self.settings.deadline + 0.2)
        self.listeners.close()
        await self.forwarder.stop()
        return 0

    def _control(self) -> _Control:
        self.control = _Control(self, self.rest)
        return self.control

    def on_main_gone(self) -> None:
        if not self.stop.is_set():
            log.warning("the main process is gone: draining and exiting")
            self.stop.set()

    def handle(self, message: Any) -> None:
        kind = message[0]
        assert self.control is not None
        if kind == "drain":
            self.stop.set()
            return
        if kind == "entry":
            entry = message[1]
            try:
                self.replica.apply(entry)
            except Exception:  # noqa: BLE001 - report it; the worker goes on
                log.exception("engine call %s (#%d) failed", entry.method, entry.seq)
            if entry.method != "tick":  # ticks are acknowledged with the next entry
                self.control.send(("applied", self.replica.applied))
            return
        seq = message[1]
        try:
            value: Any = None
            if kind == "release":
                value = self.forwarder.release_delayed(message[2])
            elif kind == "probe_loops":
                self.forwarder.probe_loops()
            elif kind == "snapshot":
                parts = message[2]
                value = {}
                if "forwarder" in parts:
                    value["forwarder"] = forwarder_snapshot(self.forwarder)
                if "stats" in parts:
                    value["stats"] = self.engine.stats()
                if "clients" in parts:
                    value["clients"] = self.engine.client_stats()
                if "deps" in parts:
                    deps = self.forwarder.deps
                    value["deps"] = deps.rows() if deps is not None else {"clients": []}
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception as exc:  # noqa: BLE001 - report it; the worker goes on
            log.exception("control message %s failed", kind)
            self.control.send(("reply", seq, False, f"{type(exc).__name__}: {exc}"))
            return
        self.control.send(("reply", seq, True, value))


def _die_with_parent() -> None:
    """SIGTERM when the main process dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.workers")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the main process decides; it tells us
    _die_with_parent()
    sock = socket.socket(fileno=args.control_fd)
    init, rest = read_init(sock)
    if os.getppid() != init["parent"]:
        return 0  # the main process died before we could watch it
    settings: Settings = init["settings"]
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {init['index']} pid {os.getpid()}]: "
               "%(message)s")

    async def main() -> int:
        return await Worker(sock, init, rest).run()

    return int(run_event_loop(main(), settings.uvloop))
