# One-command set-up: `make serve` and `make test` create .venv and install what they need.
# Two stamps: `make serve` installs the runtime set only (torch, then the package: ~1 GB less than
# with the dev tools); `make test` (and lint, format) add the dev extras on top.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
TORCH_VERSION := 2.13.0

.PHONY: serve test test-all lint format venv redis browser promtool clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(DEV_STAMP)

venv: $(DEV_STAMP)

redis:
	@redis-cli ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

# Debian's Chromium for the playground's browser test (tests/test_playground.py); a no-op when present.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "make browser: installing Debian's chromium (log: $(VENV)/chromium-install.log)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >$(VENV)/chromium-install.log 2>&1 \
	      || echo "make browser: apt-get failed (see $(VENV)/chromium-install.log); the playground browser test will be skipped"; \
	  else \
	    echo "make browser: no apt-get as root here; install chromium to run the playground browser test (skipped meanwhile)"; \
	  fi; }

# Prometheus's promtool (Debian's prometheus package, the same apt-get path as `browser`): the
# test that lints a real /metrics scrape (`promtool check metrics`) and checks deploy/'s Prometheus
# configs (`promtool check config`). A no-op when present; without apt-get those tests are skipped.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "make promtool: installing Debian's prometheus (log: $(VENV)/promtool-install.log)"; \
	    mkdir -p $(VENV); \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } >$(VENV)/promtool-install.log 2>&1 \
	      || echo "make promtool: apt-get failed (see $(VENV)/promtool-install.log); the promtool tests will be skipped"; \
	  else \
	    echo "make promtool: no apt-get as root here; install promtool to run the Prometheus lint tests (skipped meanwhile)"; \
	  fi; }

serve: $(STAMP)
	$(BIN)/ddserve serve

test: $(DEV_STAMP) redis browser promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-all: $(DEV_STAMP) redis browser promtool
	$(BIN)/python -m pytest -m ""

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
