"""The control channel between the main process and one worker: a unix
socketpair carrying length-prefixed pickles, in order.

Message shapes (tuples, first item the kind):
- main -> worker: ("init", {...}) first; then ("entry", Entry) for every
  call of the replicated log; requests ("release", seq, run),
  ("probe_loops", seq), ("snapshot", seq, parts); ("drain",).
- worker -> main: ("ready", {...}), ("failed", why), ("applied", seq of the
  last log entry applied), ("reply", seq, ok, value).

The main process's end (`Channel`) never blocks: the event loop reads it
(loop.add_reader) and a request is a future resolved by its reply."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

HEADER = struct.Struct("!I")


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def unframe(buffer: bytearray) -> list[Any]:
    """Complete messages at the front of `buffer` (removed from it)."""
    out = []
    while len(buffer) >= 4:
        (size,) = HEADER.unpack_from(buffer)
        if len(buffer) < 4 + size:
            break
        out.append(pickle.loads(bytes(buffer[4:4 + size])))
        del buffer[:4 + size]
    return out


Reply = tuple[bool, Any]
"""(ok, value): value is the result, or the error text when not ok."""
CLOSED: Reply = (False, "the control channel closed")


class Channel:
    """The main process's end of one worker's control socket (non-blocking).

    `attach()` hands the socket to the running event loop: what arrives is
    read as it comes, replies resolve the futures `ask` returned, other
    messages go to `on_event`.  Unsent bytes wait for the socket to be
    writable.  Without `attach`, `pump()` reads what is there (tests)."""

    def __init__(self, sock: socket.socket,
                 on_event: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_event = on_event
        self.out = bytearray()
        self.inbuf = bytearray()
        self.events: list[Any] = []
        """Messages other than replies, when there is no `on_event`."""
        self.closed = False
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self.closed:
            loop.add_reader(self.sock.fileno(), self.pump)
            self.flush()

    def send(self, message: Any) -> None:
        if self.closed:
            return
        self.out += frame(message)
        self.flush()

    def ask(self, kind: str, *args: Any) -> asyncio.Future[Reply]:
        """Send (kind, seq, *args); the future gets the reply (CLOSED if the
        channel closes first).  Needs a running loop."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        if self.closed:
            future.set_result(CLOSED)
            return future
        self._seq += 1
        self._waiting[self._seq] = future
        future.add_done_callback(partial(self._forget, self._seq))
        self.send((kind, self._seq, *args))
        return future

    def _forget(self, seq: int, _: object) -> None:
        self._waiting.pop(seq, None)

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close()
                return
            del self.out[:sent]
        if self._loop is None or self.closed:
            return
        if self.out and not self._writing:
            self._loop.add_writer(self.sock.fileno(), self.flush)
            self._writing = True
        elif not self.out and self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False

    def pump(self) -> None:
        """Read what is there, without waiting, and dispatch it."""
        while not self.closed:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close()
                break
            self.inbuf += chunk
        for message in unframe(self.inbuf):
            if message[0] == "reply":
                future = self._waiting.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result((message[2], message[3]))
            elif self.on_event is not None:
                self.on_event(message)
            else:
                self.events.append(message)

    def _close(self) -> None:
        if self._loop is not None and not self.closed:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
                self._writing = False
        self.closed = True
        self.out.clear()
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_result(CLOSED)
        self._waiting.clear()

    def close(self) -> None:
        self._close()
        try:
            self.sock.close()
        except OSError:
            pass


def read_init(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """The worker's first message (blocking, before its event loop runs) and
    the bytes after it (messages sent since)."""
    buffer = bytearray()
    while True:
        if len(buffer) >= 4:
            (size,) = HEADER.unpack_from(buffer)
            if len(buffer) >= 4 + size:
                kind, init = pickle.loads(bytes(buffer[4:4 + size]))
                if kind != "init":
                    raise SystemExit(f"unexpected first control message {kind!r}")
                return init, buffer[4 + size:]
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit(0)  # the main process is gone
        buffer += chunk
