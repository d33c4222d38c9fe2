# traffic-shaper: `make demo` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit schema system-tools bench bench-tools bench-hotpath bench-decisions soak clean
SOAK_MINUTES ?= 10

# Debian ships venv/ensurepip separately; install it when the interpreter lacks it.
$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)

# Two steps: the package and what it needs (from source: quick), then the data path compiled
# with mypyc (setup.py; about a minute), again whenever a module of the package changes (the
# compiled code takes the types of what it imports). Until then, the data path runs from
# source (proxy/native.py).
NATIVE   := $(VENV)/.native-stamp

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=77'
	SHAPER_PURE=1 $(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

$(NATIVE): $(STAMP) setup.py $(wildcard proxy/*.py)
	@{ command -v gcc >/dev/null 2>&1 && $(BIN)/python -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; } || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends gcc python3-dev; }
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c 'import proxy.native as n, sys; n.active or sys.exit("compiled build not in use: " + n.reason)'
	@touch $@

demo: $(NATIVE)
	$(BIN)/shaper demo -c rollouts.yaml

# Debian packages the tests drive: promtool (from prometheus) checks the /metrics output and
# deploy/prometheus, and the prometheus server scrapes a proxy in tests/test_deploy.py;
# systemd-analyze (from systemd; no running systemd needed) verifies deploy/systemd;
# chromium runs the dashboard's browser tests (Playwright drives it; no browser download).
system-tools:
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends systemd || \
	  echo "systemd-analyze could not be installed: deploy/systemd is checked statically only"; }
	@[ -x /usr/bin/chromium ] || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench setup.py
	$(BIN)/ruff format --check proxy tests bench setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(NATIVE)
	$(BIN)/python -m pytest -q
	@echo "the raw-bytes harness and the head fuzzer again, on aiohttp's pure-Python parser:"
	AIOHTTP_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_raw_bytes.py tests/test_fuzz_heads.py
	@echo "the data path's own tests again, run from source (the build without compiled modules):"
	SHAPER_PURE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_native.py \
		tests/test_forward.py tests/test_raw_bytes.py tests/test_listener.py tests/test_client.py

test: $(STAMP) system-tools lint typecheck unit

# Peers for the speed benchmark, from Debian's packages when they can be installed; valgrind
# counts the instructions of one proxied request (bench/hotpath.py).
bench-tools:
	@command -v wrk >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1 && command -v haproxy >/dev/null 2>&1 && command -v valgrind >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends wrk nginx-light haproxy valgrind || \
	  echo "bench: could not install wrk/nginx/haproxy/valgrind; running with what is here"; }

# traffic-shaper against nginx, HAProxy and a plain aiohttp proxy, in one run on loopback.
bench: $(NATIVE) bench-tools
	$(BIN)/python bench/run.py

# The CPU cost of one proxied request in memory: microseconds, and instructions under callgrind.
bench-hotpath: $(NATIVE) bench-tools
	$(BIN)/python bench/hotpath.py --callgrind

# Constant load with chaos (faults, reloads, flag flips, a canary going bad) and a verdict.
soak: $(NATIVE)
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

# How the canary analysis decides, over many simulated rollouts (no sockets, seconds to run).
bench-decisions: $(NATIVE)
	$(BIN)/python bench/decisions.py

schema: $(STAMP)
	$(BIN)/shaper schema -o schema/rollouts.schema.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis test-artifacts build proxy/_native.json
	rm -f proxy/*.so *.so
