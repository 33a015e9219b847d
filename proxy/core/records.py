"""Zone-file lines to dnslib records, for `spoof: records`.

Owner names may be relative to the query name, which is not known until a
query comes: lines are parsed with a placeholder origin (`ORIGIN`), and
`relative` / `resolve` put the query's labels in its place later.
"""

from __future__ import annotations

from dnslib import QTYPE, RR, DNSLabel

ORIGIN = "dnschaos-query-name.invalid."
"""Stands for the query name while the records are parsed."""
_ORIGIN_LABELS = tuple(DNSLabel(ORIGIN).label)


def parse_records(lines: list[str], ttl: int) -> list[RR]:
    """Zone-file lines to records; '@', an empty owner or a line starting with
    the type ('A 10.0.0.1') stand for the query name.  ValueError on bad lines."""
    records: list[RR] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        first = text.split()[0]
        if line[:1].isspace() or first.isdigit() or first in ("IN", "CH", "HS") or (
            first.isupper() and hasattr(QTYPE, first)
        ):
            text = "@ " + text
        try:
            parsed = RR.fromZone(text, origin=ORIGIN, ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - dnslib raises several kinds
            raise ValueError(f"invalid record {line!r}: {exc}") from None
        if not parsed:
            raise ValueError(f"invalid record {line!r}")
        if any(ORIGIN in str(rr.rdata) for rr in parsed):
            # Only owners may be relative to the query name; a relative name in
            # the data would go out as the internal placeholder.
            raise ValueError(f"invalid record {line!r}: names in record data must be "
                             "absolute (end with a dot)")
        records += parsed
    return records


def relative(name: DNSLabel) -> tuple[bytes, ...] | None:
    """The labels before the query name when `name` was written relative to it, else None."""
    labels = tuple(name.label)
    if labels[-len(_ORIGIN_LABELS) :] == _ORIGIN_LABELS:
        return labels[: -len(_ORIGIN_LABELS)]
    return None


def resolve(name: DNSLabel, qlabels: list[bytes]) -> list[bytes]:
    """The labels of `name`, the query's labels put in for the placeholder origin."""
    before = relative(name)
    return [*before, *qlabels] if before is not None else list(name.label)
