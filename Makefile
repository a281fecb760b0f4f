# Set-up and the two entry points of the README: `make demo` and `make test`.
# Every target is idempotent: a second run only checks stamps.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install mosquitto lint clean

demo: install mosquitto
	$(BIN)/fleet demo

test: install mosquitto
	$(BIN)/python -m pytest

install: $(STAMP)

# torch comes first and pinned: 2.13.0 is the CPU build on local disk; any range would
# let pip pick a newer multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[device,server,dev]'
	touch $(STAMP)

# The broker and its clients come from Debian's packages when absent.
mosquitto:
	@command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; }

lint: install
	$(BIN)/ruff check fleet server device tests

clean:
	rm -rf $(VENV)
