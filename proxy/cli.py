"""The `dnschaos` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import DEFAULT_ADMIN, DEFAULT_LISTEN, Settings
from proxy.errors import DnschaosError, InvalidFile

log = logging.getLogger("dnschaos")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnschaos", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dnschaos {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", help="YAML file with the same options as these flags")
    run.add_argument("--listen", action="append",
                     help=f"address to answer on, UDP and TCP (repeatable; default {DEFAULT_LISTEN})")
    run.add_argument("--upstream", action="append", dest="upstreams", metavar="HOST[:PORT]",
                     help="resolver to forward to (repeatable; default: /etc/resolv.conf)")
    run.add_argument("--admin", metavar="HOST:PORT",
                     help=f"HTTP listener for /metrics and /health (default {DEFAULT_ADMIN}; 'off')")
    run.add_argument("--allow", action="append", metavar="CIDR",
                     help="client network allowed to query (repeatable; default loopback only)")
    run.add_argument("--policy", choices=["sequential", "round_robin", "random"])
    run.add_argument("--timeout", help="per-upstream attempt timeout (default 1s)")
    run.add_argument("--deadline", help="SERVFAIL after this long without an answer (default 3s)")
    run.add_argument("--scenario", metavar="FILE",
                     help="scenario file to start when the proxy starts")
    run.add_argument("--time-scale", type=float, metavar="FACTOR",
                     help="override the scenarios' time_scale (0.01: a 1 h scenario in 36 s)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-uvloop", dest="uvloop", action="store_const", const=False,
                     help="use the standard asyncio event loop")

    validate = commands.add_parser("validate", help="check scenario files")
    validate.add_argument("files", nargs="+")
    commands.add_parser("schema", help="print the JSON Schema of scenario files")

    demo = commands.add_parser("demo", help="watch a fault happen, offline")
    demo.add_argument("--interval", type=float, default=0.7, help="seconds between rounds of queries")
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    """The config file's values, overridden by the flags given."""
    from proxy.loader import load_model

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DnschaosError(f"cannot read config file: {exc}") from None
        values = load_model(text, str(path), Settings).model_dump(exclude_unset=True)
    for key in ("listen", "upstreams", "admin", "allow", "policy", "timeout", "deadline",
                "log_level", "uvloop"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    from pydantic import ValidationError

    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise DnschaosError(f"invalid option: {problems}") from None
    return settings.with_resolv_conf()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_event_loop(main: Any, use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level)
    from proxy.core.engine import Engine
    from proxy.loader import load_scenario
    from proxy.server import Server

    scenario = load_scenario(args.scenario) if args.scenario else None
    if scenario is not None and args.time_scale is not None:
        if args.time_scale <= 0:
            raise DnschaosError("--time-scale must be greater than 0")
        scenario = scenario.model_copy(update={"time_scale": args.time_scale})

    async def main() -> None:
        engine = Engine()
        if scenario is not None:
            now = time.time()
            engine.load(scenario, started_at=now, now=now)
            log.info("scenario %s started: %d phases, %.1f s in all", scenario.name,
                     len(scenario.phases), scenario.total_duration)
        await Server(settings, engine).run_until_signalled()

    run_event_loop(main(), settings.uvloop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "validate":
            from proxy.loader import main_validate

            return main_validate(args.files)
        if args.command == "schema":
            from proxy.loader import main_schema

            return main_schema()
        if args.command == "demo":
            from proxy.demo import run_demo

            return run_demo(args.interval)
    except InvalidFile as exc:
        print(exc, file=sys.stderr)
        return 2
    except DnschaosError as exc:
        print(f"dnschaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
