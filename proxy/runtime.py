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


def run_event_loop(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    if use_uvloop:
        return uvloop.run(main)
    return asyncio.run(main)
