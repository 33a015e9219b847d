"""Watches the scenario directory: any change re-reads it (see Catalog.reload),
as SIGHUP does.  Stops when `stop` is set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from watchfiles import awatch

log = logging.getLogger("dnschaos.gameday")


async def watch(directory: str, on_change: Callable[[], object], stop: asyncio.Event) -> None:
    path = Path(directory)
    if not path.is_dir():
        log.error("scenario directory %s does not exist: not watching it", directory)
        return
    log.info("watching %s for scenario files", directory)
    try:
        async for _changes in awatch(path, stop_event=stop, debounce=200, step=50,
                                     recursive=False):
            try:
                on_change()
            except Exception:  # noqa: BLE001 - a bad reload must not stop the watcher
                log.exception("reloading the scenario directory failed")
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001
        log.exception("the scenario directory watcher stopped")
