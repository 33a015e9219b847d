"""A small DNS client for the compose game day: asks the proxy for a few
names in a loop and prints what it got every 10 seconds.  Standard library
only, so it runs in any python image.

Environment: DNS_SERVER (default dnschaos), DNS_PORT (1053), NAMES
(comma-separated, default api/db/cdn/checkout.shop.test), QPS (5), TIMEOUT
(2 seconds).
"""

from __future__ import annotations

import collections
import os
import random
import socket
import struct
import time

RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def query(name: str, qtype: int = 1) -> tuple[int, bytes]:
    qid = random.randrange(65536)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
    qname = b"".join(bytes([len(label)]) + label.encode()
                     for label in name.rstrip(".").split(".")) + b"\0"
    return qid, header + qname + struct.pack("!HH", qtype, 1)


def ask(sock: socket.socket, server: tuple[str, int], name: str) -> str:
    qid, wire = query(name)
    sock.sendto(wire, server)
    deadline = time.monotonic() + sock.gettimeout()
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            break
        if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid:
            return RCODES.get(data[3] & 0x0F, f"RCODE{data[3] & 0x0F}")
    return "TIMEOUT"


def main() -> None:
    host = os.environ.get("DNS_SERVER", "dnschaos")
    port = int(os.environ.get("DNS_PORT", "1053"))
    names = [n.strip() for n in os.environ.get(
        "NAMES", "api.shop.test,db.shop.test,cdn.shop.test,checkout.shop.test").split(",")
        if n.strip()]
    interval = 1.0 / float(os.environ.get("QPS", "5"))
    timeout = float(os.environ.get("TIMEOUT", "2"))
    server = (socket.gethostbyname(host), port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    counts: collections.Counter[str] = collections.Counter()
    shown = time.monotonic()
    print(f"asking {server[0]}:{port} for {', '.join(names)} at {1 / interval:g} qps",
          flush=True)
    while True:
        name = random.choice(names)
        counts[f"{name} {ask(sock, server, name)}"] += 1
        if time.monotonic() - shown >= 10:
            print(" | ".join(f"{k}: {v}" for k, v in sorted(counts.items())), flush=True)
            counts.clear()
            shown = time.monotonic()
        time.sleep(interval)


if __name__ == "__main__":
    main()
