"""Names and numbers of query types and response codes."""

from __future__ import annotations

from dnslib import QTYPE, RCODE, DNSError


def qtype_number(value: str | int) -> int:
    """'AAAA' -> 28, '65' -> 65, 'TYPE65' -> 65; ValueError for unknown names."""
    text = str(value).strip().upper()
    if text.isdigit() and 0 <= int(text) <= 65535:
        return int(text)
    if text.startswith("TYPE") and text[4:].isdigit():
        return int(text[4:])
    try:
        return int(getattr(QTYPE, text))
    except (AttributeError, DNSError):
        raise ValueError(f"unknown query type {value!r}") from None


def qtype_name(number: int) -> str:
    return str(QTYPE.get(number, f"TYPE{number}"))


# Extended rcodes (12 bits with EDNS, RFC 6891 / 8945 / 7873): dnslib's RCODE knows 0-10.
EXTENDED_RCODES = {"BADVERS": 16, "BADSIG": 16, "BADKEY": 17, "BADTIME": 18, "BADMODE": 19,
                   "BADNAME": 20, "BADALG": 21, "BADTRUNC": 22, "BADCOOKIE": 23}


def rcode_number(value: str | int) -> int:
    """'NXDOMAIN' -> 3, 2 -> 2; ValueError for unknown names or out of range."""
    text = str(value).strip().upper()
    if text.isdigit():
        if int(text) > 4095:
            raise ValueError(f"rcode {value} out of range 0-4095")
        return int(text)
    if text in EXTENDED_RCODES:
        return EXTENDED_RCODES[text]
    try:
        return int(getattr(RCODE, text))
    except (AttributeError, DNSError):
        raise ValueError(f"unknown rcode {value!r}") from None
