# The two commands of the contract: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-faults bench infra down lint clean observe lock

# Installs exactly the versions of requirements-dev.lock (hash-checked), then the project itself.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# After changing dependencies in pyproject.toml: pin them again (requirements.lock is what the
# Dockerfile installs; requirements-dev.lock adds the test and bench extras).
LOCK := $(BIN)/pip-compile -q --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip-tools
	$(LOCK) -o requirements.lock pyproject.toml
	$(LOCK) --extra test --extra bench -o requirements-dev.lock pyproject.toml

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

# ruff (rule set in pyproject.toml) over everything; mypy over the application and tooling.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean: down
	rm -rf .run
