# One obvious way to work. Everything runs from a venv in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install check test demo bench clean

$(BIN)/stillhouse: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $(BIN)/stillhouse

install: $(BIN)/stillhouse  ## venv + everything (idempotent)

check: install  ## lint, format, types, migrations drift (SQLite; CI also checks Postgres)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	rm -f .stillhouse/check.db
	STILLHOUSE_DATABASE_URL=sqlite:///.stillhouse/check.db $(BIN)/alembic upgrade head
	STILLHOUSE_DATABASE_URL=sqlite:///.stillhouse/check.db $(BIN)/alembic check

test: install  ## the whole suite, against real Postgres, Redis and the local teacher
	$(BIN)/pytest -q

demo: install  ## label the bundled BBC corpus with the local teacher, train, compare
	$(BIN)/stillhouse demo

bench: install  ## long benchmarks, outside CI
	@ls bench/*.py >/dev/null 2>&1 && for b in bench/*.py; do $(BIN)/python $$b; done || echo "no benchmarks yet"

clean:
	rm -rf .stillhouse runs .pytest_cache .mypy_cache .ruff_cache
