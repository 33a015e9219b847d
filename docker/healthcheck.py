#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET /ready on the admin listener (listening, and
following the control plane when there is one; not upstream health: a dead
upstream is a fault the proxy passes on as SERVFAIL), found as
`dnschaos run` finds it: DNSCHAOS_ADMIN_LISTEN, else the config file
($DNSCHAOS_CONFIG), else the default.  (An admin address given as a flag to
the container is not seen here: set it in the environment or the file.)"""

from __future__ import annotations

import argparse
import sys
import urllib.request

from proxy.cli import settings_values
from proxy.config import ADMIN_PORT, DEFAULT_ADMIN, format_hostport, split_hostport

WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def main() -> int:
    try:
        admin = settings_values(argparse.Namespace(config=None)).get("admin", DEFAULT_ADMIN)
        if admin in (None, "", "off"):
            return 0  # no admin listener to ask
        host, port = split_hostport(admin, ADMIN_PORT)
        url = f"http://{format_hostport(WILDCARD.get(host, host), port)}/ready"
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 0 if reply.status == 200 else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
