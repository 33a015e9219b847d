"""`dnschaos demo`: its own zone server, the proxy and the game-day manager
(the same one `dnschaos run` uses) walk a short scenario; the output shows
every phase in order, the faults while they are in force, and the counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_walks_every_phase_and_counts_the_faults() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "proxy", "demo", "--interval", "0.3"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    phases = re.findall(r"^--- phase (\S+)$", out, re.M)
    assert phases == ["baseline", "api-gone", "db-brownout", "recovered"], out
    sections = dict(zip(phases, re.split(r"^--- phase \S+$", out, flags=re.M)[1:], strict=True))
    assert "api.demo.test    NOERROR" in sections["baseline"]
    assert "api.demo.test    NXDOMAIN" in sections["api-gone"]
    assert "db.demo.test     SERVFAIL" in sections["db-brownout"]
    over = out.split("--- scenario over: everything reverted")[1]
    assert over.count("NOERROR") == 3  # every fault reverted
    counts = dict(re.findall(r"^  (\S+/\S+)\s+\S+\s+(\d+ / \d+)$", out, re.M))
    assert set(counts) == {"api-gone/api-nxdomain", "db-brownout/db-slow-servfail",
                           "db-brownout/shop-empty"}, out
    matched, injected = map(int, counts["api-gone/api-nxdomain"].split(" / "))
    assert matched == injected > 0
    assert done.stderr == ""  # warnings and up: nothing went wrong
