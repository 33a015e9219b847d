"""What the engine tells the transport to do with a query.

`Engine.on_query` returns None (forward unchanged: the common case) or one
of these.  The transport carries it out: it waits `delay` seconds without
holding up other queries, then replies, drops or forwards.

A verdict with a delay also names the run whose rule gave it (`run`, opaque
to the transport): the transport files the held query under it, so that
stopping or pausing that run lets go of its held queries only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the client with these bytes (already carrying the client's ID)."""

    wire: bytes
    delay: float = 0.0
    """Seconds to wait before answering."""
    run: str | None = None
    """The id of the run that holds the query in the delay (set by the engine
    when `delay` > 0)."""


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing back."""

    delay: float = 0.0
    """Seconds to wait before the drop takes effect (for TCP, before closing)."""
    close_tcp: bool = False
    """For a TCP client: close the connection (True) or leave it open and silent."""
    run: str | None = None
    """The id of the run that holds the query in the delay (set by the engine
    when `delay` > 0)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward to the upstream, maybe late, maybe with a response-side fault."""

    delay: float = 0.0
    """Seconds to wait before forwarding."""
    respond: Any = None
    """When not None, the transport passes the upstream's answer to
    `Engine.on_response(query, verdict, answer, now, rng)` and sends what that
    returns (None: drop).  Opaque to the transport."""
    run: str | None = None
    """The id of the run that holds the query in the delay (set by the engine
    when `delay` > 0)."""


Verdict = Reply | Drop | Forward
