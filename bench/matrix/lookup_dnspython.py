"""dnspython's stub resolver (A then AAAA) asking SERVER:PORT for each name on
stdin, one JSON line each; the error is dnspython's exception class."""

import json
import sys
import time

import dns.resolver

resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = [sys.argv[1]]
resolver.port = int(sys.argv[2])
resolver.timeout, resolver.lifetime = 1.0, 3.0

for line in sys.stdin:
    name = line.strip()
    started = time.monotonic()
    out: dict = {}
    addresses: list[str] = []
    try:
        for qtype in ("A", "AAAA"):
            try:
                addresses += [r.to_text() for r in resolver.resolve(name, qtype)]
            except dns.resolver.NoAnswer:
                if qtype == "AAAA" and addresses:
                    continue
                raise
        out["addresses"] = addresses
    except Exception as exc:  # the class is the outcome we report
        out["error"] = type(exc).__name__
    out["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    print(json.dumps(out), flush=True)
