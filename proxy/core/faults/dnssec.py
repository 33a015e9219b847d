"""dnssec: break DNSSEC validation in the upstream's signed answer.

Real DNSSEC incidents fail at validating resolvers only: the .ru TLD in
2024 published bad signatures, Slack in 2021 served broken denial of
existence.  The proxy cannot sign, so each mode damages what the signed
upstream sent, on the wire, in a way a validator rejects for one reason:

  bogus_signature    every RRSIG's signature bytes inverted
  expired_signature  every RRSIG's validity window moved into the past
  not_yet_valid      ... into the future (signature bytes kept)
  strip_signatures   every RRSIG removed
  empty_dnskey       a DNSKEY answer without its DNSKEY records (NOERROR, NODATA)
  ds_mismatch        a DNSKEY answer whose key-signing keys (SEP flag) have
                     other public key bytes, so no key matches the DS
  bad_denial         the NSEC/NSEC3 proofs of negative answers: their
                     RRSIGs inverted (`denial: bogus`) or the proofs removed
                     (`denial: strip`)

Only queries with the DO bit get RRSIGs, so only they are touched; others
pass as if no rule matched.  The validity window is moved relative to
itself (no clock needed): an upstream's valid signature has inception <= now
<= expiration, so the window ending `shift` before its old inception has
expired, and one starting `shift` after its old expiration is not yet valid.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from random import Random
from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.core import wire
from proxy.core.faults.base import PhaseState, ResponseFault
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.replies import without_records
from proxy.core.spec import Base, Duration, format_duration
from proxy.core.stale import StaleStore
from proxy.core.verdict import Verdict

Break = Literal["bogus_signature", "expired_signature", "not_yet_valid", "strip_signatures",
                "empty_dnskey", "ds_mismatch", "bad_denial"]
_SEP = 0x0001  # DNSKEY flags: secure entry point, the key a DS names (RFC 4034 2.1.1)
_DENIAL = (wire.NSEC, wire.NSEC3)
DEFAULT_SHIFT = 7 * 86400.0
"""Beyond the clock skew validators allow (unbound: up to a day)."""


class DnssecFault(Base):
    """Break DNSSEC validation of the signed upstream's answers to DO queries
    (one `break` mode); validating resolvers answer SERVFAIL."""

    type: Literal["dnssec"]
    break_: Break = Field(alias="break")
    """What to break: bogus_signature, expired_signature, not_yet_valid,
    strip_signatures, empty_dnskey, ds_mismatch or bad_denial."""
    shift: Annotated[Duration, Field(gt=0)] | None = None
    """expired_signature / not_yet_valid: how far beyond the old window the
    new one lies (default 7 days)."""
    denial: Literal["bogus", "strip"] | None = None
    """bad_denial: invert the proofs' signatures (bogus, the default) or
    remove the NSEC/NSEC3 records and their RRSIGs (strip)."""

    @model_validator(mode="after")
    def _options_fit_the_mode(self) -> DnssecFault:
        if self.shift is not None and self.break_ not in ("expired_signature", "not_yet_valid"):
            raise ValueError("shift goes with break: expired_signature or not_yet_valid")
        if self.denial is not None and self.break_ != "bad_denial":
            raise ValueError("denial goes with break: bad_denial")
        return self


# --- the rewrites, on raw bytes -------------------------------------------------------


def _rrsigs(data: bytes, covers: Callable[[int], bool] = lambda rtype: True,
            ) -> tuple[bytearray, list[wire.Rrsig]]:
    """A copy of the message to change, and the RRSIGs covering what `covers` picks."""
    found = [wire.rrsig_fields(data, span) for span in wire.layout(data)[1]
             if span.rtype == wire.RRSIG]
    return bytearray(data), [sig for sig in found if covers(sig.covered)]


def invert_signatures(data: bytes, covers: Callable[[int], bool] = lambda rtype: True) -> bytes:
    """Every chosen RRSIG's signature bytes XOR 0xFF: the rest of the record intact."""
    out, sigs = _rrsigs(data, covers)
    for sig in sigs:
        out[sig.signature:sig.end] = bytes(b ^ 0xFF for b in data[sig.signature:sig.end])
    return bytes(out)


def move_validity(data: bytes, shift: int, *, future: bool) -> bytes:
    """Every RRSIG's window (same length) moved to end `shift` seconds before
    its inception, or to start `shift` seconds after its expiration (serial
    arithmetic, RFC 4034 3.1.5)."""
    out, sigs = _rrsigs(data)
    for sig in sigs:
        expiration, inception = struct.unpack_from("!II", data, sig.expiration)
        length = (expiration - inception) % 2**32
        if future:
            inception = (expiration + shift) % 2**32
            expiration = (inception + length) % 2**32
        else:
            expiration = (inception - shift) % 2**32
            inception = (expiration - length) % 2**32
        struct.pack_into("!II", out, sig.expiration, expiration, inception)
    return bytes(out)


def covered_type(data: bytes, span: wire.Span) -> int | None:
    """The type an RRSIG covers; None for other records."""
    return wire.rrsig_fields(data, span).covered if span.rtype == wire.RRSIG else None


def strip(data: bytes, types: frozenset[int] | None) -> bytes:
    """Without the RRSIGs (covering `types`, or all when None) and without
    the records of `types` themselves."""
    def remove(span: wire.Span) -> bool:
        if types is None:
            return span.rtype == wire.RRSIG
        return span.rtype in types or covered_type(data, span) in types
    return without_records(data, remove)


def other_keys(data: bytes) -> bytes:
    """Every DNSKEY with the SEP flag (all DNSKEYs if none has it) with its
    public key bytes inverted: its key tag and digest change, so the DS that
    named it matches no key."""
    keys = [span for span in wire.layout(data)[1] if span.rtype == wire.DNSKEY
            and span.end >= span.rdata + 4]
    sep = [span for span in keys if data[span.rdata + 1] & _SEP]
    out = bytearray(data)
    for span in sep or keys:
        start = span.rdata + 4  # past flags, protocol, algorithm
        out[start:span.end] = bytes(b ^ 0xFF for b in data[start:span.end])
    return bytes(out)


# --- the behaviour ------------------------------------------------------------------


@register(DnssecFault)
class Dnssec(ResponseFault):
    """Break DNSSEC validation of signed answers to DO queries (RRSIGs, DNSKEY, DS, NSEC)."""

    def __init__(self, spec: DnssecFault, store: StaleStore) -> None:
        super().__init__(spec, store)
        self.mode = spec.break_
        self.shift = spec.shift if spec.shift is not None else DEFAULT_SHIFT
        self.denial = spec.denial or "bogus"
        shift = int(self.shift)
        rewrites: dict[str, Callable[[bytes], bytes]] = {
            "bogus_signature": invert_signatures,
            "expired_signature": lambda data: move_validity(data, shift, future=False),
            "not_yet_valid": lambda data: move_validity(data, shift, future=True),
            "strip_signatures": lambda data: strip(data, None),
            "empty_dnskey": lambda data: strip(data, frozenset({wire.DNSKEY})),
            "ds_mismatch": other_keys,
            "bad_denial": (
                (lambda data: invert_signatures(data, lambda rtype: rtype in _DENIAL))
                if self.denial == "bogus" else lambda data: strip(data, frozenset(_DENIAL))),
        }
        self.rewrite = rewrites[self.mode]

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        # Without DO the answer has no RRSIGs and the client validates nothing.
        return self.verdict if wire.dnssec_ok(q.wire, q.qend) else None

    def respond(self, q: QueryView, answer: bytes, run_time: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        return self.rewrite(answer)

    def describe(self) -> str:
        text = "dnssec: " + {
            "bogus_signature": "bogus signatures (RRSIG bytes inverted)",
            "expired_signature": "expired signatures",
            "not_yet_valid": "signatures not yet valid",
            "strip_signatures": "RRSIGs stripped",
            "empty_dnskey": "DNSKEY answered empty",
            "ds_mismatch": "DNSKEY matching no DS (key-signing keys changed)",
            "bad_denial": f"bad denial of existence (NSEC/NSEC3 {self.denial})",
        }[self.mode]
        if self.mode in ("expired_signature", "not_yet_valid"):
            text += f", by {format_duration(self.shift)}"
        return text
