# The two commands of the contract: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-faults bench infra down lint clean observe

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/inventory-devenv run

# Prometheus (OS package) scraping the processes of a running `make run`; prints its URL.
observe: $(STAMP)
	$(BIN)/inventory-observe

infra: $(STAMP)
	$(BIN)/inventory-devenv up

test: infra
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-faults: infra
	$(BIN)/pytest -q -m faults tests/faults

bench: infra
	$(BIN)/python -m bench.run $(BENCH_ARGS)

down:
	$(BIN)/inventory-devenv down

lint: $(STAMP)
	$(BIN)/ruff check .

clean: down
	rm -rf .run
