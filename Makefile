# Targets used by people and CI alike.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup redis-server browser serve test lint format bench soak clean

setup: $(STAMP) redis-server

# torch is installed first and pinned: pip then takes the CPU wheel from the local disk
# instead of resolving a CUDA build through some other dependency.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The Redis KV tier's tests start a real redis-server. Install it where this can be done
# (root with apt-get); elsewhere say why and go on: those tests then skip, naming the reason.
redis-server:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "setup: redis-server missing and not root: Redis tier tests will skip"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "setup: redis-server missing and no apt-get: Redis tier tests will skip"; \
	elif ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq redis-server) >/dev/null 2>&1; then \
		echo "setup: apt-get could not install redis-server: Redis tier tests will skip"; \
	fi

# The HTML report tests render reports in headless Chromium through chromedriver (`make
# test` only: serving does not need a browser). Same rules as redis-server: install where
# apt-get can, else say why (those tests then skip).
browser:
	@if command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "setup: chromium/chromedriver missing and not root: browser tests will skip"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "setup: chromium/chromedriver missing and no apt-get: browser tests will skip"; \
	elif ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver) >/dev/null 2>&1; then \
		echo "setup: apt-get could not install chromium: browser tests will skip"; \
	fi

serve: setup
	$(VENV)/bin/pdserve serve $(ARGS)

test: setup browser
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) benchmarks/run_all.py

# 30 minutes of steady load with the RSS of router and workers sampled (docs/benchmarks.md).
soak: setup
	$(PY) benchmarks/soak.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
