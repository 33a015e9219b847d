"""The `dnschaos` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy import __version__
from proxy.api_client import add_client_commands, run_client
from proxy.config import DEFAULT_ADMIN, DEFAULT_LISTEN, Settings
from proxy.core.engine import Engine
from proxy.core.schedule import parse_time
from proxy.core.spec import parse_duration
from proxy.demo import run_demo
from proxy.errors import DnschaosError, InvalidFile
from proxy.loader import load_model, load_scenario, main_schema, main_validate
from proxy.runtime import run_event_loop, setup_logging
from proxy.server import Server

log = logging.getLogger("dnschaos")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnschaos", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dnschaos {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run the proxy",
        epilog="Each option is taken from, first to last: a flag, its DNSCHAOS_* environment "
               f"variable ({', '.join([*ENV_SETTINGS, *ENV_RUN])}; lists comma-separated), "
               "the config file, the default.")
    run.add_argument("--config",
                     help="YAML file with the same options as these flags "
                          "(default $DNSCHAOS_CONFIG)")
    run.add_argument("--listen", action="append",
                     help=f"address to answer on, UDP and TCP "
                          f"(repeatable; default {DEFAULT_LISTEN})")
    run.add_argument("--upstream", action="append", dest="upstreams", metavar="HOST[:PORT]",
                     help="resolver to forward to (repeatable; default: /etc/resolv.conf)")
    run.add_argument("--admin", metavar="HOST:PORT",
                     help=f"HTTP listener for /metrics and /health "
                          f"(default {DEFAULT_ADMIN}; 'off')")
    run.add_argument("--allow", action="append", metavar="CIDR",
                     help="client network allowed to query (repeatable; default loopback only)")
    run.add_argument("--policy", choices=["sequential", "round_robin", "random"])
    run.add_argument("--timeout", help="per-upstream attempt timeout (default 1s)")
    run.add_argument("--deadline", help="SERVFAIL after this long without an answer (default 3s)")
    run.add_argument("--scenario", metavar="FILE",
                     help="scenario file to start when the proxy starts")
    run.add_argument("--time-scale", type=float, metavar="FACTOR",
                     help="override the scenarios' time_scale (0.01: a 1 h scenario in 36 s)")
    run.add_argument("--at", metavar="TIME",
                     help="start --scenario at this time (ISO 8601 with a zone: 2026-12-01T14:00Z)")
    run.add_argument("--dry-run", action="store_true",
                     help="run --scenario as a dry run: count, change no answer")
    run.add_argument("--scenario-dir", metavar="DIR",
                     help="watched directory of scenario files (schedules start by themselves)")
    run.add_argument("--max-run-duration", metavar="DURATION",
                     help="hard cap on any run (default 4h)")
    run.add_argument("--metrics-auth", dest="metrics_auth", action="store_const", const=True,
                     help="/metrics needs the admin token too")
    run.add_argument("--ended-run-retention", metavar="DURATION",
                     help="how long /metrics keeps an ended run's series (default 10m)")
    run.add_argument("--audit-log", metavar="FILE", help="JSON lines of every API mutation")
    run.add_argument("--report-dir", metavar="DIR", help="where run reports are written")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--workers", type=int, metavar="N",
                     help="processes answering DNS on the same port (SO_REUSEPORT; default 1)")
    run.add_argument("--no-deps", dest="deps", action="store_const", const=False,
                     help="keep no dependency map (to measure its cost)")
    run.add_argument("--control", metavar="URL",
                     help="shared control plane: redis://HOST:PORT/DB or rediss://USER:PASS@... "
                          "(several instances, one game day; default: none)")
    run.add_argument("--control-grace", metavar="DURATION",
                     help="heal after this long without the control plane (default 30s)")
    run.add_argument("--control-prefix", metavar="PREFIX",
                     help="prefix of the control plane's Redis keys (default 'dnschaos:')")
    run.add_argument("--instance-name", metavar="NAME",
                     help="this instance's name on the control plane (default HOSTNAME:PID)")
    run.add_argument("--no-uvloop", dest="uvloop", action="store_const", const=False,
                     help="use the standard asyncio event loop")
    run.add_argument("--no-accel", dest="accelerate", action="store_const", const=False,
                     help="relay UDP in Python only, without the C fast path")

    validate = commands.add_parser("validate", help="check scenario files")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--max-run-duration", metavar="DURATION", default="4h",
                          help="the proxy's max_run_duration, to warn about runs it would "
                               "cut (default 4h)")
    commands.add_parser("schema", help="print the JSON Schema of scenario files")

    demo = commands.add_parser("demo", help="watch a fault happen, offline")
    demo.add_argument("--interval", type=float, default=0.7,
                      help="seconds between rounds of queries")

    add_client_commands(commands)
    return parser


ENV_SETTINGS = {
    "DNSCHAOS_LISTEN": "listen",
    "DNSCHAOS_UPSTREAMS": "upstreams",
    "DNSCHAOS_ADMIN_LISTEN": "admin",
    "DNSCHAOS_ALLOW": "allow",
    "DNSCHAOS_POLICY": "policy",
    "DNSCHAOS_TIMEOUT": "timeout",
    "DNSCHAOS_DEADLINE": "deadline",
    "DNSCHAOS_LOG_LEVEL": "log_level",
    "DNSCHAOS_ADMIN_TOKEN": "admin_token",
    "DNSCHAOS_CONTROL": "control",
    "DNSCHAOS_CONTROL_PREFIX": "control_prefix",
    "DNSCHAOS_INSTANCE_NAME": "instance_name",
    "DNSCHAOS_ACCEL": "accelerate",
}
"""Environment variables `dnschaos run` reads, and the setting each sets.
(DNSCHAOS_ADMIN_LISTEN is where the proxy serves its API; the client
commands find that API through DNSCHAOS_API, a URL.)"""
ENV_LISTS = ("listen", "upstreams", "allow")
"""Settings given in the environment as a list: comma- or space-separated."""
ENV_CONFIG = "DNSCHAOS_CONFIG"
ENV_RUN = ("DNSCHAOS_SCENARIO", "DNSCHAOS_TIME_SCALE")
"""Variables for `dnschaos run`'s own flags --scenario and --time-scale (not settings)."""
FLAG_SETTINGS = ("listen", "upstreams", "admin", "allow", "policy", "timeout", "deadline",
                 "log_level", "uvloop", "scenario_dir", "max_run_duration", "audit_log",
                 "report_dir", "workers", "metrics_auth", "ended_run_retention", "deps",
                 "control", "control_grace", "control_prefix", "instance_name",
                 "accelerate")


def settings_values(args: argparse.Namespace,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given, before validation.  Each source overrides the ones
    before it, for the keys it sets: the built-in defaults (not included), the
    config file (--config, else $DNSCHAOS_CONFIG), the DNSCHAOS_* environment
    variables that are set and not empty, the flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = args.config or environ.get(ENV_CONFIG)
    if config:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DnschaosError(f"cannot read config file: {exc}") from None
        values = load_model(text, str(path), Settings).model_dump(exclude_unset=True)
    for name, key in ENV_SETTINGS.items():
        text = environ.get(name, "").strip()
        if text:
            values[key] = text.replace(",", " ").split() if key in ENV_LISTS else text
    for key in FLAG_SETTINGS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return values


def load_settings(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """The validated settings (see settings_values), upstreams from resolv.conf
    when none are given."""
    values = settings_values(args, environ)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(p) for p in e["loc"]),
                                    e["msg"].removeprefix("Value error, "))))
            for e in exc.errors()
        )
        raise DnschaosError(f"invalid option: {problems}") from None
    return settings.with_resolv_conf()


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level)
    settings.check_admin_token()
    start: list[dict[str, Any]] = []
    scenario_file = args.scenario or os.environ.get("DNSCHAOS_SCENARIO", "").strip()
    time_scale = args.time_scale
    if time_scale is None and os.environ.get("DNSCHAOS_TIME_SCALE", "").strip():
        try:
            time_scale = float(os.environ["DNSCHAOS_TIME_SCALE"])
        except ValueError:
            raise DnschaosError("DNSCHAOS_TIME_SCALE must be a number") from None
    if scenario_file:
        scenario = load_scenario(scenario_file)
        spec: dict[str, Any] = {"scenario": scenario, "file": scenario_file, "trigger": "cli",
                                "dry_run": bool(args.dry_run)}
        if time_scale is not None:
            if time_scale <= 0:
                raise DnschaosError("--time-scale must be greater than 0")
            spec["time_scale"] = time_scale
        if args.at:
            try:
                spec["at"] = parse_time(args.at)
            except ValueError as exc:
                raise DnschaosError(f"--at: {exc}") from None
        start.append(spec)
    elif args.at or args.dry_run:
        raise DnschaosError("--at and --dry-run need --scenario FILE")

    async def main() -> None:
        await Server(settings, Engine(), start=start).run_until_signalled()

    run_event_loop(main(), settings.uvloop)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return code
    except BrokenPipeError:
        # `dnschaos ... | head`: the reader has what it wanted.  Python flushes
        # stdout again at exit, so point it at devnull to keep that quiet too
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "validate":
            try:
                cap = parse_duration(args.max_run_duration)
            except ValueError as exc:
                raise DnschaosError(f"--max-run-duration: {exc}") from None
            return main_validate(args.files, cap)
        if args.command == "schema":
            return main_schema()
        if args.command == "demo":
            return run_demo(args.interval)
        if args.command in ("scenario", "rule", "reset", "report", "deps", "preview",
                            "recovery"):
            return run_client(args)
    except InvalidFile as exc:
        print(exc, file=sys.stderr)
        return 2
    except DnschaosError as exc:
        print(f"dnschaos: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
