# Two commands for a fresh machine: `make run` and `make test`.
# Everything they need is installed from here: the virtual environment
# (Python packages pinned in pyproject.toml) and, for tests and the
# benchmark, Debian packages (real resolvers and clients).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

# Debian packages the tests use: real upstreams (unbound, nsd), real
# clients (dig), DNSSEC zone signing (ldns-utils).
TEST_DEBS := unbound nsd bind9-dnsutils ldnsutils prometheus
TEST_BINS := unbound nsd dig ldns-signzone promtool prometheus
BENCH_DEBS := nsd dnsperf dnsdist dnsmasq-base
BENCH_BINS := nsd dnsperf dnsdist dnsmasq

.PHONY: run test demo bench validate venv test-debs bench-debs clean

run: $(STAMP)
	$(BIN)/dnschaos run $(ARGS)

demo: $(STAMP)
	$(BIN)/dnschaos demo

test: $(STAMP) test-debs
	$(BIN)/dnschaos validate scenarios/
	$(BIN)/pytest $(PYTEST_ARGS)

validate: $(STAMP)
	$(BIN)/dnschaos validate scenarios/

bench: $(STAMP) bench-debs
	$(BIN)/python bench/run.py $(ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test-debs:
	@bash scripts/need-debs.sh "$(TEST_BINS)" "$(TEST_DEBS)"

bench-debs:
	@bash scripts/need-debs.sh "$(BENCH_BINS)" "$(BENCH_DEBS)"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
