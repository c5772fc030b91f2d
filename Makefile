# crm-sync — two commands on a fresh machine with Python 3.11 and git:
#   make demo   create .venv, start the embedded PostgreSQL, seed the sample sources, run every DAG, print a summary
#   make test   the whole test suite (installs what it needs first)
#   make bench  benchmarks: prints figures, asserts nothing about time
#   make test-celery  the source DAGs on CeleryExecutor with two workers (needs PostgreSQL and Redis, see README)
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP  := $(VENV)/.installed

.PHONY: demo test test-celery bench install status clean db-stop

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "crm-sync needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crm-sync demo $(if $(SCENARIO),--scenario $(SCENARIO),)

status: $(STAMP)
	$(BIN)/crm-sync status

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# every source DAG on CeleryExecutor with two workers against the machine's PostgreSQL (CRM_SYNC_TEST_DSN) and
# broker (CRM_SYNC_CELERY_BROKER), checked against an `airflow dags test` run of the same data; not part of `make test`
test-celery: $(STAMP)
	$(BIN)/python tests/celery/run.py $(TEST_CELERY_ARGS)

# BENCH_PIPELINE_ARGS="--customers 100000" scales the pipeline benchmark down (default: 1,000,000 customers)
bench: $(STAMP)
	$(BIN)/python bench/bench_load.py $(BENCH_LOAD_ARGS)
	$(BIN)/python bench/bench_identity.py $(BENCH_IDENTITY_ARGS)
	$(BIN)/python bench/bench_linkage.py $(BENCH_LINKAGE_ARGS)
	$(BIN)/python bench/bench_sources.py $(BENCH_SOURCES_ARGS)
	$(BIN)/python bench/bench_pipeline.py $(BENCH_PIPELINE_ARGS)

db-stop: $(STAMP)
	$(BIN)/crm-sync db-stop

clean: db-stop
	rm -rf .local
