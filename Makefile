# One home for every command: the README, CI and people all call these.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format bench docs clean

# Creates the virtualenv and installs the project with every extra and the dev tools.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts examples/fullstack
	$(BIN)/ruff format --check src tests benchmarks scripts examples/fullstack
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts examples/fullstack
	$(BIN)/ruff check --fix src tests benchmarks scripts examples/fullstack

# The documentation site in site/, strict (any warning fails); needs no network. The
# variable silences mkdocs-material's banner about its successor, which is not a warning
# about the docs.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The whole benchmark suite (about 2.5 hours: 10,000 schema tenants are registered for scale,
# whose database pg_costs then measures and drops, and 10,000 more for the fleet), then the
# summary and the targets table in docs/performance.md.
bench: $(STAMP)
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null || { echo "bench: install wrk"; exit 2; }
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/scale.py --keep-database
	$(BIN)/python benchmarks/pg_costs.py
	$(BIN)/python benchmarks/scale.py --strategy rls --sizes 10,100000
	$(BIN)/python benchmarks/saturation.py --keep-database
	@command -v valgrind >/dev/null || apt-get install -y -q valgrind >/dev/null || { echo "bench: install valgrind"; exit 2; }
	$(BIN)/python benchmarks/instructions.py
	$(BIN)/python benchmarks/lookups.py --backend postgres
	$(BIN)/python benchmarks/lookups.py --backend sqlite
	$(BIN)/python benchmarks/lookup_cache.py --tenants 100000
	$(BIN)/python benchmarks/gc_freeze.py --tenants 10000
	$(BIN)/python benchmarks/provisioning.py
	$(BIN)/python benchmarks/ratelimit.py
	$(BIN)/python benchmarks/fleet.py --tenants 100
	$(BIN)/python benchmarks/fleet.py --tenants 1000
	$(BIN)/python benchmarks/fleet.py --tenants 10000 --noop-only
	$(BIN)/python benchmarks/noisy.py
	$(BIN)/python benchmarks/roundtrips.py
	$(BIN)/python benchmarks/citus.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache site
