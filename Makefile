# Two commands on a fresh machine: `make run` (the example app) and `make test` (everything).
# Both install from the committed lock (requirements/dev-pyXY.txt, hashes checked), so every
# machine gets exactly what CI got until `make lock` is run again.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
PYTAG := $(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])')
LOCK ?= requirements/dev-py$(PYTAG).txt
# The Pythons the locks are made for: the ones the project supports and CI runs.
LOCK_PYTHONS := 3.11 3.12 3.13
# pytest-xdist workers: the suite waits on real servers far more than it computes
PYTEST_WORKERS ?= 4
PIP_INSTALL := python -m pip install -q --disable-pip-version-check

.PHONY: install deps run test test-fast test-quick lint typecheck docs pytest bench lock \
	test-lowest test-latest dist check-wheel screenshot clean

install: $(VENV)/.installed

$(VENV)/.installed: $(wildcard $(LOCK)) pyproject.toml tests/ai_sdk/package-lock.json \
		tools/package-lock.json
	@test -f $(LOCK) || { echo "no lock for this Python ($(LOCK)): use 3.11-3.13, or run 'make lock'" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/$(PIP_INSTALL) --require-hashes --no-deps -r $(LOCK)
	$(BIN)/$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	@# the AI SDK's own client, for tests/test_ai_sdk.py (package-lock.json pins it)
	if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/ai_sdk --no-audit --no-fund --loglevel=error; \
	  npm ci --prefix tools --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the AI SDK tests will skip (CI fails on a skip)" >&2; fi
	touch $@

# The programs the system tier drives (redis-server, nginx, chromium, prometheus, ...):
# installed with apt-get on Debian/Ubuntu; elsewhere it says what to install.
deps:
	bash scripts/system-deps.sh

run: install
	PORT=$(PORT) $(BIN)/python -m example_app

lint: install
	$(BIN)/ruff check .  # the complexity ceiling (10) is pyproject.toml's, everywhere
	$(BIN)/ruff format --check .
	$(BIN)/hadolint deploy/Dockerfile
	@if command -v docker-compose >/dev/null 2>&1; then \
	  docker-compose -f deploy/docker-compose.yml config -q && echo "deploy/docker-compose.yml: valid"; \
	elif [ "$$QUART_CLAUDE_REQUIRE_ALL" = 1 ]; then \
	  echo "docker-compose is missing: the compose file was not checked" >&2; exit 1; \
	else echo "COMPOSE FILE NOT CHECKED: apt-get install docker-compose" >&2; fi

typecheck: install
	$(BIN)/mypy

# The documentation site (docs/, mkdocs.yml) into site/: a broken link or anchor fails it.
docs: install
	$(BIN)/mkdocs build --strict --quiet

pytest: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The tiers (CONTRIBUTING.md): core (no sockets, seconds), server (in-process servers, the
# bulk), system (subprocesses, signals, nginx, Chromium, Node, Prometheus, real defaults).
# The inner loop is test-fast (core); test-quick adds the server tier; `make test` runs all.
test-fast: install
	$(BIN)/pytest -q -m core $(PYTEST_ARGS)

test-quick: install
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m "core or server" $(PYTEST_ARGS)

# The checks run beside the suite (-j: mypy and the docs build take a core for under a
# minute, while the suite mostly waits on real servers); -Oline keeps each line whole.
test: install
	@$(MAKE) --no-print-directory -j4 -Oline lint typecheck docs pytest

bench: install
	$(BIN)/python -m bench.run  # the upstream over TLS, as production's (--plain: HTTP)
	$(BIN)/python -m bench.takeover
	$(BIN)/python -m bench.tool_loop

# Regenerate the locks after changing a dependency in pyproject.toml (existing pins are kept
# where they still fit); `make lock UPGRADE=1` moves every pin to the newest release.
# (With no lock yet for this Python, point UV at any uv: `make lock UV=uv`.)
UV ?= $(BIN)/uv
UV_COMPILE = UV_CUSTOM_COMPILE_COMMAND="make lock" $(UV) pip compile -q pyproject.toml \
	--generate-hashes $(if $(UPGRADE),--upgrade)
lock: $(if $(wildcard $(LOCK)),install)
	for v in $(LOCK_PYTHONS); do \
	  t=$$(echo $$v | tr -d .); \
	  $(UV_COMPILE) --python-version $$v --extra uvloop --extra redis --extra flask --extra db --extra postgresql --extra bedrock --extra vertex --group dev \
	    -o requirements/dev-py$$t.txt || exit 1; \
	  $(UV_COMPILE) --python-version $$v --extra uvloop --extra redis --extra flask --extra db --extra postgresql --extra bedrock --extra vertex \
	    -o requirements/runtime-py$$t.txt || exit 1; \
	done
	$(UV_COMPILE) --python-version 3.11 --resolution lowest-direct --extra uvloop --extra redis --extra flask --extra db --extra postgresql --extra bedrock --extra vertex \
	  --group test --group build -o requirements/lowest-py311.txt

# What a change of a dependency's version can break: the core and server tiers, and the
# system tests marked deps (Hypercorn's CLI and private hook, Gunicorn, prometheus-client's
# multiprocess mode, Quart's default timeout). The 3.13, lowest and newest legs run this.
VERSIONED := -m "core or server or deps"

# The lowest versions pyproject.toml allows (Python 3.11): proves the lower bounds. Without
# the Redis Cluster tests: a cluster store needs redis-py 8.1 and refuses to start below it
# (tests/test_config.py checks the refusal there).
test-lowest:
	$(MAKE) pytest VENV=.venv-lowest LOCK=requirements/lowest-py311.txt \
	  PYTEST_ARGS='$(VERSIONED) -k "not cluster" $(PYTEST_ARGS)'

# The newest release of everything, no lock: drift seen here before users see it.
# It does not gate CI (a new upstream release is not our regression); CI prints its outcome.
test-latest:
	$(PYTHON) -m venv --clear .venv-latest
	.venv-latest/bin/$(PIP_INSTALL) --upgrade pip
	.venv-latest/bin/$(PIP_INSTALL) --upgrade -e '.[uvloop,redis,flask,db,postgresql,psycopg,bedrock,vertex]' --group dev
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(anthropic|quart|hypercorn|httpx2|aiohttp|redis|pytest|mypy|ruff)=' | tr '\n' ' '; echo
	.venv-latest/bin/ruff check .
	.venv-latest/bin/mypy
	.venv-latest/bin/pytest -n $(PYTEST_WORKERS) $(VERSIONED) $(PYTEST_ARGS)

# An sdist and a wheel in dist/, checked by twine.
dist: install
	rm -rf dist build
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist .
	$(BIN)/twine check --strict dist/*

# The wheel as a user gets it: a clean venv with the locked runtime dependencies only, then,
# from outside the checkout, import the public API and stream one reply through a real server.
check-wheel: dist
	$(BIN)/python scripts/check_wheel.py --python $(PYTHON) \
	  --runtime-lock requirements/runtime-py$(PYTAG).txt dist/*.whl \
	  --pyright tools/node_modules/.bin/pyright

clean:
	rm -rf .venv .venv313 .venv-lowest .venv-latest .mypy_cache .pytest_cache .ruff_cache \
	  *.egg-info dist build

# The docs' screenshot of the chat page mid-reply, taken by the browser e2e test.
screenshot: install
	QUART_CLAUDE_SCREENSHOT=1 $(BIN)/pytest -q tests/test_browser.py -k progressively
