"""Selectors: every key with a row that selects and a row that does not."""

from __future__ import annotations

import random
import time

import pytest
from dnslib import DNSRecord

from proxy.core.model import Match
from proxy.core.query import QueryView
from proxy.core.sampling import hash_share
from proxy.core.selectors import Selector, label_suffixes, normalize_name


def query(name: str = "www.example.com", qtype: str = "A", *, client: str = "192.0.2.10",
          transport: str = "udp", listener: str = "127.0.0.1:53") -> QueryView:
    wire = bytes(DNSRecord.question(name, qtype).pack())
    return QueryView.parse(wire, client, transport, listener)


def selects(match: dict, q: QueryView, progress: float = 0.0, seed: int = 1) -> bool:
    return Selector(Match.model_validate(match)).matches(q, progress, random.Random(seed))


# (match, query keyword arguments, selected?)
ROWS = [
    # empty match: every query
    ({}, {}, True),
    # name: exact, case-insensitive, trailing dot optional
    ({"name": "www.example.com"}, {}, True),
    ({"name": "WWW.Example.COM."}, {"name": "www.EXAMPLE.com"}, True),
    ({"name": ["a.example.com", "www.example.com"]}, {}, True),
    ({"name": "example.com"}, {}, False),
    ({"name": "www.example.com"}, {"name": "www.example.com.evil"}, False),
    # suffix: on label boundaries only
    ({"suffix": "amazonaws.com"}, {"name": "amazonaws.com"}, True),
    ({"suffix": "amazonaws.com"}, {"name": "x.amazonaws.com"}, True),
    ({"suffix": "amazonaws.com."}, {"name": "a.b.AmazonAWS.com"}, True),
    ({"suffix": "amazonaws.com"}, {"name": "xamazonaws.com"}, False),
    ({"suffix": "amazonaws.com"}, {"name": "amazonaws.com.evil"}, False),
    ({"suffix": "com"}, {"name": "example.com"}, True),
    ({"suffix": "."}, {"name": "anything.org"}, True),
    ({"suffix": ["org", "net"]}, {"name": "example.com"}, False),
    # glob: fnmatch, case-insensitive, '*' crosses dots
    ({"glob": "*.s3.amazonaws.com"}, {"name": "bucket.s3.amazonaws.com"}, True),
    ({"glob": "*.s3.amazonaws.com"}, {"name": "a.b.s3.amazonaws.com"}, True),
    ({"glob": "*.s3.amazonaws.com"}, {"name": "s3.amazonaws.com"}, False),
    ({"glob": "dynamodb.*.amazonaws.com"}, {"name": "DynamoDB.us-east-1.amazonaws.com"}, True),
    ({"glob": "DYNAMODB.*.AMAZONAWS.COM."}, {"name": "dynamodb.us-east-1.amazonaws.com"}, True),
    ({"glob": "dynamodb.*.amazonaws.com"}, {"name": "sqs.us-east-1.amazonaws.com"}, False),
    ({"glob": "ww?.example.com"}, {}, True),
    ({"glob": "ww?.example.com"}, {"name": "wwww.example.com"}, False),
    # regex: searched in the lower-case name without trailing dot
    ({"regex": r"^dynamodb\.[a-z0-9-]+\.amazonaws\.com$"},
     {"name": "DYNAMODB.us-east-1.amazonaws.com."}, True),
    ({"regex": r"example\.com$"}, {}, True),
    ({"regex": r"\.$"}, {}, False),  # no trailing dot to find
    ({"regex": [r"^api\.", r"^auth\."]}, {}, False),
    # qtype: by name or number
    ({"qtype": "A"}, {}, True),
    ({"qtype": ["AAAA", "A"]}, {"qtype": "AAAA"}, True),
    ({"qtype": 65}, {"qtype": "HTTPS"}, True),
    ({"qtype": "TYPE65"}, {"qtype": "HTTPS"}, True),
    ({"qtype": "AAAA"}, {}, False),
    # transport
    ({"transport": "udp"}, {}, True),
    ({"transport": "tcp"}, {"transport": "tcp"}, True),
    ({"transport": "tcp"}, {}, False),
    # clients: IPv4 and IPv6 networks, exclusions win
    ({"clients": "192.0.2.0/24"}, {}, True),
    ({"clients": "192.0.2.10"}, {}, True),
    ({"clients": "10.0.0.0/8"}, {}, False),
    ({"clients": "2001:db8::/32"}, {"client": "2001:db8::53"}, True),
    ({"clients": "2001:db8::/32"}, {"client": "2001:db9::53"}, False),
    ({"clients": "192.0.2.0/24"}, {"client": "::ffff:192.0.2.10"}, True),  # dual-stack socket
    ({"clients": ["10.0.0.0/8", "192.0.2.0/24"]}, {}, True),
    ({"exclude_clients": "192.0.2.10"}, {}, False),
    ({"exclude_clients": "192.0.2.11"}, {}, True),
    ({"clients": "192.0.2.0/24", "exclude_clients": "192.0.2.8/29"}, {}, False),
    ({"clients": "192.0.2.0/24", "exclude_clients": "192.0.2.8/29"}, {"client": "192.0.2.20"},
     True),
    ({"clients": "0.0.0.0/0"}, {"client": "not an address"}, False),
    # listener: host:port exactly, or a bare address on any port
    ({"listener": "127.0.0.2:53"}, {"listener": "127.0.0.2:53"}, True),
    ({"listener": "127.0.0.2:53"}, {"listener": "127.0.0.1:53"}, False),
    ({"listener": "127.0.0.2"}, {"listener": "127.0.0.2:5353"}, True),
    ({"listener": "::1"}, {"listener": "[::1]:5353"}, True),
    ({"listener": "[::1]:53"}, {"listener": "[::1]:5353"}, False),
    # keys are ANDed
    ({"suffix": "example.com", "qtype": "A", "transport": "udp"}, {}, True),
    ({"suffix": "example.com", "qtype": "AAAA"}, {}, False),
    # all / any / not
    ({"all": [{"suffix": "com"}, {"qtype": "A"}]}, {}, True),
    ({"all": [{"suffix": "com"}, {"qtype": "MX"}]}, {}, False),
    ({"any": [{"suffix": "org"}, {"qtype": "A"}]}, {}, True),
    ({"any": [{"suffix": "org"}, {"qtype": "MX"}]}, {}, False),
    ({"not": {"suffix": "org"}}, {}, True),
    ({"not": {"suffix": "com"}}, {}, False),
    ({"suffix": "com", "not": {"any": [{"name": "www.example.com"}, {"qtype": "MX"}]}}, {},
     False),
    # sampling keys that always or never select
    ({"probability": 1.0}, {}, True),
    ({"probability": 0.0}, {}, False),
    ({"hash": {"by": "client", "share": 1.0}}, {}, True),
    ({"hash": {"by": "name", "share": 0.0}}, {}, False),
    ({"every": 1}, {}, True),
    ({"every": 2}, {}, False),  # the first query of each two
    ({"first": 0}, {}, False),
    ({"first": 5}, {}, True),
]


@pytest.mark.parametrize(("match", "kwargs", "expected"), ROWS)
def test_selector_table(match: dict, kwargs: dict, expected: bool) -> None:
    assert selects(match, query(**kwargs)) is expected


def test_every_key_has_rows_both_ways() -> None:
    keys = {key for key in Match.model_fields} | {"not"}
    keys.discard("not_")
    for key in keys:
        outcomes = {expected for match, _, expected in ROWS if key in match}
        assert outcomes == {True, False}, key


@pytest.mark.parametrize(("text", "normal"), [
    ("Example.COM.", "example.com"), (".", ""), ("", ""), ("  a.b  ", "a.b"), ("a\\.", "a\\."),
])
def test_normalize_name(text: str, normal: str) -> None:
    assert normalize_name(text) == normal


def test_label_suffixes_walk_boundaries_and_respect_escapes() -> None:
    assert list(label_suffixes("a.b.c")) == ["a.b.c", "b.c", "c", ""]
    assert list(label_suffixes("")) == [""]
    assert list(label_suffixes("a\\.b.c")) == ["a\\.b.c", "c", ""]
    assert list(label_suffixes("a\\046x.c")) == ["a\\046x.c", "c", ""]


def test_suffix_with_an_escaped_dot_is_not_a_boundary() -> None:
    wire = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03a.b\x01c\x00\x00\x01\x00\x01"
    q = QueryView.parse(wire, "192.0.2.1", "udp")
    assert q.qname == "a\\.b.c"
    assert selects({"suffix": "c"}, q)
    assert not selects({"suffix": "b.c"}, q)


def test_ten_thousand_suffixes_stay_cheap() -> None:
    zones = [f"zone{i}.example" for i in range(10_000)]
    selector = Selector(Match(suffix=zones))
    hit, miss = query("a.b.zone9999.example"), query("a.b.zone10000.example")
    assert selector.matches(hit) and not selector.matches(miss)
    begin = time.perf_counter()
    for _ in range(10_000):
        selector.matches(hit)
        selector.matches(miss)
    # A list scan would take ~10^8 comparisons here; the dict walk takes microseconds.
    assert time.perf_counter() - begin < 1.0


def test_client_cache_is_bounded() -> None:
    selector = Selector(Match(clients=["10.0.0.0/8"]))
    q = query()
    for i in range(10_000):
        selector.matches(q._replace(client=f"10.{i // 256 % 256}.{i % 256}.1"))
    cache = selector._checks[0].__closure__  # type: ignore[attr-defined]
    sizes = [len(c.cell_contents) for c in cache if isinstance(c.cell_contents, dict)]
    assert sizes and max(sizes) <= 4096


# --- sampling -------------------------------------------------------------------


def test_probability_zero_never_and_one_always() -> None:
    rng = random.Random(7)
    never, always = Selector(Match(probability=0.0)), Selector(Match(probability=1.0))
    q = query()
    assert not any(never.matches(q, 0.0, rng) for _ in range(1000))
    assert all(always.matches(q, 0.0, rng) for _ in range(1000))


def test_probability_is_binomial() -> None:
    rng = random.Random(42)
    selector = Selector(Match(probability=0.3))
    q = query()
    hits = sum(selector.matches(q, 0.0, rng) for _ in range(10_000))
    # mean 3000, standard deviation ~45.8: 4 sigma either way
    assert 2817 <= hits <= 3183


def test_probability_is_reproducible_with_a_seed() -> None:
    def run() -> list[bool]:
        rng = random.Random(3)
        selector = Selector(Match(probability=0.5))
        return [selector.matches(query(), 0.0, rng) for _ in range(200)]

    assert run() == run()


@pytest.mark.parametrize(("progress", "low", "high"), [
    (0.0, 0, 0), (0.5, 400, 600), (1.0, 1000, 1000), (2.0, 1000, 1000), (-1.0, 0, 0),
])
def test_ramp_follows_phase_progress(progress: float, low: int, high: int) -> None:
    rng = random.Random(5)
    selector = Selector(Match.model_validate({"probability": {"from": 0.0, "to": 1.0}}))
    hits = sum(selector.matches(query(), progress, rng) for _ in range(1000))
    assert low <= hits <= high


def test_ramp_down() -> None:
    rng = random.Random(5)
    selector = Selector(Match.model_validate({"probability": {"from": 1, "to": 0}}))
    assert all(selector.matches(query(), 0.0, rng) for _ in range(100))
    assert not any(selector.matches(query(), 1.0, rng) for _ in range(100))


def test_every_counts_only_otherwise_selected_queries() -> None:
    selector = Selector(Match(suffix=["example.com"], every=3))
    results = []
    for i in range(9):
        results.append(selector.matches(query("www.example.com")))
        assert not selector.matches(query(f"other{i}.org"))  # must not advance the count
    assert results == [False, False, True] * 3


def test_first_counts_only_otherwise_selected_queries() -> None:
    selector = Selector(Match(qtype=["AAAA"], first=2))
    assert not selector.matches(query(qtype="A"))
    assert [selector.matches(query(qtype="AAAA")) for _ in range(4)] == [True, True, False, False]


def test_every_then_first() -> None:
    selector = Selector(Match(every=2, first=2))
    assert [selector.matches(query()) for _ in range(8)] == [False, True, False, True] + [False] * 4


def test_sampling_does_not_draw_for_unselected_queries() -> None:
    rng = random.Random(9)
    state = rng.getstate()
    selector = Selector(Match(suffix=["org"], probability=0.5))
    assert not selector.matches(query("www.example.com"), 0.0, rng)
    assert rng.getstate() == state


def test_hash_share_is_stable_and_independent_of_rng() -> None:
    clients = [f"10.0.{i // 256}.{i % 256}" for i in range(2000)]
    selector = Selector(Match.model_validate({"hash": {"by": "client", "share": 0.3, "seed": 1}}))
    q = query()
    first = [selector.matches(q._replace(client=c), 0.0, random.Random(1)) for c in clients]
    again = [selector.matches(q._replace(client=c), 0.0, random.Random(2)) for c in clients]
    assert first == again
    assert 450 <= sum(first) <= 750  # about 30%


def test_hash_by_name_picks_names_not_clients() -> None:
    selector = Selector(Match.model_validate({"hash": {"by": "name", "share": 0.5, "seed": 4}}))
    for name in ("a.example.com", "b.example.com", "c.example.com"):
        answers = {selector.matches(query(name, client=f"10.0.0.{i}")) for i in range(20)}
        assert len(answers) == 1  # the same for every client


def test_hash_seed_changes_the_share() -> None:
    names = [f"n{i}.example" for i in range(200)]
    one = [hash_share(1, n) < 0.5 for n in names]
    two = [hash_share(2, n) < 0.5 for n in names]
    assert one != two


def test_not_around_sampling() -> None:
    rng = random.Random(11)
    selector = Selector(Match.model_validate({"not": {"probability": 0.3}}))
    q = query()
    hits = sum(selector.matches(q, 0.0, rng) for _ in range(10_000))
    assert 6817 <= hits <= 7183


def test_without_sampling_keys_are_ignored() -> None:
    match = Match.model_validate({"suffix": "example.com", "probability": 0.0, "first": 0,
                                  "not": {"probability": 0.5}})
    selector = Selector(match, sampling=False)
    assert selector.matches(query("www.example.com"))
    assert not selector.matches(query("www.example.org"))


@pytest.mark.parametrize(("match", "text"), [
    ({}, "every query"),
    ({"suffix": "example.com", "qtype": ["A", 28]}, "suffix example.com, qtype A,AAAA"),
    ({"probability": {"from": 1, "to": 0}}, "p=1->0"),
    ({"not": {"name": "x"}, "every": 2}, "not(name x), every 2"),
    ({"hash": {"share": 0.3}}, "hash 0.3 of clients"),
])
def test_describe(match: dict, text: str) -> None:
    assert Selector(Match.model_validate(match)).describe() == text
