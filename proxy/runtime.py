"""Process set-up shared by the command line, the demo and the worker
processes: logging and the event loop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended, whatever it
    ended with: at shutdown nothing is left to handle its failure."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass


def run_event_loop(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    if use_uvloop:
        return uvloop.run(main)
    return asyncio.run(main)
