"""Replies the kernel will not take: the proxy's UDP send buffer filled up,
for real, inside a network namespace of its own.

Run as `unshare -n python -m support.full_send_buffer DIR` (cwd tests/): it
brings up that namespace's loopback, starts unbound and the proxy there, and
holds the proxy's replies to clients in a slow traffic-control queue (an htb
class selected by the proxy's source port only), so the
listener's send buffer stays charged and sendmmsg gets EAGAIN.  Prints one
JSON object: what the client got, what the proxy counted, and the
namespace's own UDP SndbufErrors (nothing else in it is throttled, so they
are the proxy's)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from support import zone
from support.dnsutil import make_query, udp
from support.proxy_process import ProxyLauncher
from support.unbound import Unbound

BURST = 2000
"""Queries sent while the replies are held: far more than the send buffer holds."""


def sndbuf_errors() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("SndbufErrors")])


def burst(port: int, count: int, first_id: int) -> int:
    """Send `count` queries from one socket, then read replies for one
    second: how many came back."""
    query = bytearray(make_query(zone.WWW, "A").to_wire())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for number in range(count):
            query[0:2] = ((first_id + number) & 0xFFFF).to_bytes(2, "big")
            sock.sendto(query, ("127.0.0.1", port))
            if number % 32 == 31:
                time.sleep(0.001)  # the proxy's receive buffer is not what is tested
        got, end = 0, time.monotonic() + 1.0
        try:
            while got < count and time.monotonic() < end:
                sock.settimeout(max(end - time.monotonic(), 0.001))
                sock.recv(4096)
                got += 1
        except TimeoutError:
            pass
        return got


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


def main(workdir: Path) -> dict[str, int]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (workdir / "unbound").mkdir(exist_ok=True)
    server = Unbound(workdir / "unbound").start()
    launcher = ProxyLauncher(workdir, lambda: [server])
    try:
        proxy = launcher.start()
        udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=3)  # onto the fast path
        out = {"answered_before": burst(proxy.port, 200, 0),
               "unsent_before": int(proxy.metric("dnschaos_udp_replies_unsent_total"))}
        kernel = sndbuf_errors()
        # Everything at full speed (class 1:10) but the proxy's replies to
        # clients: 1 KB/s (class 1:30), queued without limit meanwhile.
        tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
        tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb",
           "rate", "10gbit")
        tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:30", "htb",
           "rate", "8kbit", "ceil", "8kbit")
        tc("qdisc", "add", "dev", "lo", "parent", "1:30", "handle", "30:", "pfifo",
           "limit", "100000")
        tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32",
           "match", "ip", "sport", str(proxy.port), "0xffff", "flowid", "1:30")
        try:
            out["answered_held"] = burst(proxy.port, BURST, 1000)
        finally:
            tc("qdisc", "del", "dev", "lo", "root")  # the held replies are dropped
        out["kernel_sndbuf_errors"] = sndbuf_errors() - kernel
        out["unsent"] = int(proxy.metric("dnschaos_udp_replies_unsent_total"))
        out["fast"] = int(proxy.metric("dnschaos_fast_path_queries_total"))
        out["answered_after"] = burst(proxy.port, 200, 5000)
        return out
    finally:
        launcher.stop_all()
        server.stop()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
