# Every entry point of the project; CI calls only these.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.deps-installed
export PYO3_PYTHON := $(abspath $(PY))

INTEROP ?= .venv-interop

.PHONY: help install build demo test test-rust test-py test-interop interop-venv demo-lmcache demo-vllm test-interpreters lint bench fuzz soak clean

help:  ## list the entry points
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.7,<2" uvloop httptools msgpack pyyaml pyzmq msgspec prometheus_client nats-py \
		pytest pytest-timeout hypothesis numpy mypy xxhash torch atheris
	touch $(STAMP)

install: $(STAMP) build  ## create .venv with every dependency and build the extension

build: $(STAMP)  ## build the Rust extension into .venv (release mode)
	$(VENV)/bin/maturin develop --release -q

demo: install  ## run the spec's flow: controller + worker, then the spec's /lookup
	$(PY) -m lmcache_rs.demo

# pytest and the real-engine tests run side by side: the engine tests mostly wait for vLLM and
# LMCache processes to start, so on two cores the pair takes about 15 minutes instead of 22.
test: install test-rust interop-venv  ## run every test (cargo test, pytest, the real engines)
	$(MAKE) --no-print-directory -j2 --output-sync=target test-py test-interop SETUP_DONE=1

test-rust:
	cargo test --release

test-py:
	$(PY) -m pytest -q --ignore=tests/interop

demo-lmcache: install interop-venv  ## the spec's flow with a real LMCache engine (CPU) reporting over LMCache's protocol
	$(PY) tools/demo_lmcache.py

demo-vllm: install interop-venv  ## the spec's flow on a real vLLM server (CPU) with lmcache_rs's KV connector
	$(PY) tools/demo_vllm.py

interop-venv:  ## build $(INTEROP): LMCache and vLLM on CPU (about 6 GB, once per machine)
	tools/interop_venv.sh $(INTEROP)

# (SETUP_DONE: called by `test`, which has set up both venvs; rebuilding the extension while
# pytest runs beside would replace the module under it)
test-interop: $(if $(SETUP_DONE),,install interop-venv)  ## tests against real LMCache engines (and vLLM) on loopback
	$(PY) -m pytest -q tests/interop

test-interpreters:  ## the index's tests under every CPython 3.10-3.14 installed here
	tests/other_interpreters.sh

lint: install  ## rustfmt, clippy and the type stub check
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	cargo clippy --release --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff --version >/dev/null 2>&1 || $(PIP) install -q ruff
	$(VENV)/bin/ruff check python tests benchmarks fuzz
	$(PY) -m mypy.stubtest lmcache_rs._core

bench: install  ## benchmarks side by side with the anchors (see BENCHMARKS.md)
	$(PY) benchmarks/run_all.py

fuzz: install  ## fuzz every target with 1,000,000 inputs each, zero crashes (RELIABILITY.md)
	$(PY) fuzz/run.py --runs 1000000

soak: install  ## 10-minute soak: workers admitting and evicting while clients look up (RELIABILITY.md)
	$(PY) benchmarks/soak.py --duration 600

clean:
	rm -rf target $(VENV)
