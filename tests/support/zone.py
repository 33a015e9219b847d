"""The test zone `example.test.`: what is in it, as constants tests can
assert against, and its zone-file text.

    www.example.test.        A 192.0.2.1, 192.0.2.2; AAAA 2001:db8::1
    c1 -> c2 -> c3 -> www    a CNAME chain of 3 hops
    example.test.            MX 10 mail.example.test.
    mail.example.test.       A 192.0.2.25 only (AAAA there is NODATA)
    big.example.test.        TXT of ~600 bytes  (> 512: TC without EDNS)
    huge.example.test.       TXT of ~1500 bytes (> 1232: TC with EDNS 1232 too)
    host0..host199           A 10.0.<i // 256>.<i % 256>
    nosuch.example.test.     NXDOMAIN (any name not listed)

A parent zone `test.` (PARENT, parent_zone_text) delegates to it with its
DS, for validators that check the chain (Unbound(parent=True)).
The zone is DNSSEC-signed when ldns-signzone is installed (see Unbound),
so DO queries get RRSIGs and NSEC proofs.
"""

from __future__ import annotations

ORIGIN = "example.test."
TTL = 3600
NEGATIVE_TTL = 300

WWW = "www.example.test."
WWW_A = ("192.0.2.1", "192.0.2.2")
WWW_AAAA = ("2001:db8::1",)
CNAME_HEAD = "c1.example.test."  # c1 -> c2 -> c3 -> www
CNAME_CHAIN = ("c1.example.test.", "c2.example.test.", "c3.example.test.", WWW)
MX_NAME = ORIGIN
MX_TARGET = "mail.example.test."
MAIL_A = "192.0.2.25"
NODATA_NAME, NODATA_TYPE = MX_TARGET, "AAAA"
BIG_TXT = "big.example.test."  # ~600 bytes of TXT
HUGE_TXT = "huge.example.test."  # ~1500 bytes of TXT
NXDOMAIN_NAME = "nosuch.example.test."
HOST_COUNT = 200


def host_name(i: int) -> str:
    return f"host{i}.example.test."


def host_address(i: int) -> str:
    return f"10.0.{i // 256}.{i % 256}"


def _txt_strings(total: int, tag: str) -> list[str]:
    """Character-strings of at most 255 bytes adding up to `total` bytes."""
    strings = []
    n = 0
    while total > 0:
        size = min(200, total)
        chunk = (f"{tag}{n:03d}-" * 40)[:size]
        strings.append(chunk)
        total -= size
        n += 1
    return strings


BIG_TXT_STRINGS = _txt_strings(600, "big")
HUGE_TXT_STRINGS = _txt_strings(1500, "huge")


PARENT = "test."
"""The parent zone (Unbound(parent=True)): the delegation of the test zone and its DS."""


def parent_zone_text(child_ds: str, ns_address: str = "127.0.0.1") -> str:
    lines = [
        f"$ORIGIN {PARENT}",
        f"$TTL {TTL}",
        f"@ IN SOA ns.{PARENT} hostmaster.{PARENT} 1 3600 900 604800 {NEGATIVE_TTL}",
        "@ IN NS ns",
        f"ns IN A {ns_address}",
        f"{ORIGIN} IN NS ns.{ORIGIN}",
        f"ns.{ORIGIN} IN A {ns_address}",
        child_ds,
    ]
    return "\n".join(lines) + "\n"


def zone_text(ns_address: str = "127.0.0.1", hosts: int = HOST_COUNT) -> str:
    lines = [
        f"$ORIGIN {ORIGIN}",
        f"$TTL {TTL}",
        f"@ IN SOA ns.{ORIGIN} hostmaster.{ORIGIN} 1 3600 900 604800 {NEGATIVE_TTL}",
        "@ IN NS ns",
        f"ns IN A {ns_address}",
        *(f"www IN A {a}" for a in WWW_A),
        *(f"www IN AAAA {a}" for a in WWW_AAAA),
        "c1 IN CNAME c2",
        "c2 IN CNAME c3",
        "c3 IN CNAME www",
        "@ IN MX 10 mail",
        f"mail IN A {MAIL_A}",
        "big IN TXT " + " ".join(f'"{s}"' for s in BIG_TXT_STRINGS),
        "huge IN TXT " + " ".join(f'"{s}"' for s in HUGE_TXT_STRINGS),
        *(f"host{i} IN A {host_address(i)}" for i in range(hosts)),
    ]
    return "\n".join(lines) + "\n"
