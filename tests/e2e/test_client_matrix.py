"""The CI subset of the client behaviour matrix (bench/matrix.py, issue 14):
glibc getaddrinfo, Node dns.lookup and glibc behind unbound with
serve-expired, against nxdomain, nodata, servfail and drop, through the
same runner code as the full run; and bogus_signature through a validating
unbound (SERVFAIL, EDE 6) beside glibc straight to the proxy (no DO bit:
the fault does nothing).  The outcomes are the exact names these
stacks give (measured on Debian 12: glibc 2.36, Node 20, unbound 1.17), so
a proxy change that changes what clients see fails here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from support import zone
from support.faults_support import unshare_problem

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import matrix  # noqa: E402

pytestmark = pytest.mark.e2e

ROWS = ["glibc", "node-lookup", "unbound-serve-expired"]
FAULTS = ["nxdomain", "nodata", "servfail", "drop"]
DNSSEC = [("glibc", "bogus_signature"), ("unbound-validating", "bogus_signature")]
CELLS = [(r, f) for r in ROWS for f in FAULTS] + DNSSEC
ALL_ROWS, ALL_FAULTS = [*ROWS, "unbound-validating"], [*FAULTS, "bogus_signature"]

# (row, fault): (result, queries the rule saw).  The real address stands for
# a masked fault: unbound's serve-expired answered from its expired cache.
EXPECTED = {
    ("glibc", "nxdomain"): ("EAI_NONAME", 2),
    ("glibc", "nodata"): ("EAI_NODATA", 2),
    ("glibc", "servfail"): ("EAI_AGAIN", 4),  # A and AAAA, each tried twice
    ("glibc", "drop"): ("EAI_AGAIN", 4),
    ("node-lookup", "nxdomain"): ("ENOTFOUND", 2),
    ("node-lookup", "nodata"): ("ENOTFOUND", 2),
    ("node-lookup", "servfail"): ("EAI_AGAIN", 4),
    ("node-lookup", "drop"): ("EAI_AGAIN", 4),
    ("unbound-serve-expired", "nxdomain"): ("real", None),
    ("unbound-serve-expired", "nodata"): ("real", None),
    ("unbound-serve-expired", "servfail"): ("real", None),
    ("unbound-serve-expired", "drop"): ("real", None),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    problem = unshare_problem()
    if problem:
        pytest.skip(problem)
    for tool in ("gcc", "node", "unbound"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (make test installs it)")
    return matrix.run(ALL_ROWS, ALL_FAULTS, 170.0,
                      tmp_path_factory.mktemp("matrix"), progress=lambda line: None,
                      only=set(CELLS))


def test_every_cell_measured(results):
    assert results["problems"] == {}
    assert [(c["row"], c["fault"]) for c in results["cells"]] == [
        (r, f) for r in ALL_ROWS for f in ALL_FAULTS if (r, f) in CELLS]


@pytest.mark.parametrize("row,fault", list(EXPECTED))
def test_what_the_client_got(results, row, fault):
    cell = next(c for c in results["cells"] if (c["row"], c["fault"]) == (row, fault))
    want, queries = EXPECTED[(row, fault)]
    real = [zone.host_address(int(cell["name"].split(".")[0][4:]))]
    assert cell["warm"]["addresses"] == real, cell  # the fault not applied: the real answer
    if want == "real":
        assert cell["result"]["addresses"] == real, cell
    else:
        assert cell["result"].get("error") == want, cell
        assert cell["queries"] == queries, cell
        # After the rule is removed the stub asks again at once.
        assert cell["recovery_s"] is not None and cell["recovery_s"] < 1.0, cell


def cell_of(results, row, fault):
    return next(c for c in results["cells"] if (c["row"], c["fault"]) == (row, fault))


def test_bogus_signature_changes_nothing_for_a_stub(results):
    """glibc asks without DO: the proxy passes the answer on untouched."""
    cell = cell_of(results, "glibc", "bogus_signature")
    real = [zone.host_address(int(cell["name"].split(".")[0][4:]))]
    assert cell["result"]["addresses"] == real, cell
    assert cell["queries"] == 2 and cell["outcome"] == "real", cell
    assert cell["validator_reply"] is None


def test_bogus_signature_through_a_validating_resolver(results):
    """The validating unbound finds the damaged RRSIG: SERVFAIL with EDE 6
    (DNSSEC Bogus), which glibc reports as EAI_AGAIN; unbound keeps the
    bogus answer longer than the recovery bound (val-bogus-ttl 60 s)."""
    cell = cell_of(results, "unbound-validating", "bogus_signature")
    real = [zone.host_address(int(cell["name"].split(".")[0][4:]))]
    assert cell["warm"]["addresses"] == real, cell  # validated before the fault
    assert cell["result"]["error"] == "EAI_AGAIN", cell
    assert cell["outcome"] == "temporary" and cell["queries"] > 0, cell
    assert cell["validator_reply"] == "SERVFAIL, EDE 6", cell
    assert cell["recovery_s"] is None, cell
