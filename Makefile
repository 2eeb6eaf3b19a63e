# moe-lab: the commands contributors and CI run. `make help` lists them.
# Every CI job is one of these targets, so a gate that fails on GitHub fails the same way here.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extras installed by `make install` (CI jobs that need less pass e.g. EXTRAS=dev).
EXTRAS ?= all
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
# Coverage floor used by the CI unit-test job (`make test-unit COV=1`).
COV_FAIL_UNDER ?= 80
# Benchmarks: one script per file in benchmarks/ (compare.py and _helpers excluded).
BENCHMARKS ?= $(filter-out compare _%,$(basename $(notdir $(wildcard benchmarks/*.py))))
BENCH_DIR ?= bench-results
BENCH_THRESHOLD ?=
DOCKERFILE ?= deploy/docker/Dockerfile

# The install stamp is keyed on the content of pyproject.toml + constraints.txt and on EXTRAS,
# so `make test` twice installs once, and editing the dependencies reinstalls.
DEPS_HASH := $(shell cat pyproject.toml $(CONSTRAINTS) 2>/dev/null | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16)
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))-$(DEPS_HASH)

# Tests never download anything (see tests/conftest.py); CI exports the same.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export ORT_DISABLE_TELEMETRY ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export MOE_LAB_CHROMIUM ?= /usr/bin/chromium

.PHONY: help venv install demo test test-unit test-integration test-browser test-distributed lint format \
	typecheck security secrets-baseline audit licenses sbom docs docs-serve build bench bench-compare bench-baseline \
	workflows-lint docker-lint pre-commit clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

venv: $(BIN)/python ## Create the virtual environment .venv

$(STAMP): | $(BIN)/python
	$(BIN)/python -m pip install -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) ## Install moe-lab editable with extras (EXTRAS=all) under the pins of constraints.txt

demo: install ## Train the small demo MoE on the bundled corpus (a few minutes on 2 cores), then write its routing report
	$(BIN)/moe-lab train --overwrite --name demo
	$(BIN)/moe-lab report runs/demo

test: install ## The full suite as CI runs it: pytest -m "not gpu" (slow, integration, browser, distributed)
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: install ## Fast unit tests (no services, browser or multi-process); COV=1 adds coverage
	$(BIN)/python -m pytest -m "not (gpu or integration or browser or distributed)" \
		$(if $(COV),--cov=moe_lab --cov-report=term --cov-report=xml --cov-fail-under=$(COV_FAIL_UNDER)) \
		$(PYTEST_ARGS)

test-integration: install ## Integration tests; needs MOE_LAB_TEST_POSTGRES_URL (source .ci/postgres.sh)
	@if [ -z "$${MOE_LAB_TEST_POSTGRES_URL:-}" ]; then \
		echo "error: MOE_LAB_TEST_POSTGRES_URL is not set. Start PostgreSQL with 'source .ci/postgres.sh'" \
			"or point it at a server (postgresql+psycopg://USER@HOST:PORT/DB)." >&2; exit 2; fi
	$(BIN)/python -m pytest -m "integration and not gpu" $(PYTEST_ARGS)

test-browser: install ## Headless Chromium tests (MOE_LAB_CHROMIUM=/usr/bin/chromium by default)
	@if [ ! -x "$(MOE_LAB_CHROMIUM)" ]; then \
		echo "error: no Chromium at MOE_LAB_CHROMIUM=$(MOE_LAB_CHROMIUM) (apt-get install chromium," \
			"or point MOE_LAB_CHROMIUM at a Chromium executable)." >&2; exit 2; fi
	$(BIN)/python -m pytest -m "browser and not gpu" $(PYTEST_ARGS)

test-distributed: install ## Multi-process torch.distributed tests (gloo, CPU)
	$(BIN)/python -m pytest -m "distributed and not gpu" $(PYTEST_ARGS)

lint: install ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install ## mypy (configured in pyproject.toml)
	$(BIN)/mypy

security: install ## bandit on src/ + secret scan against .secrets.baseline
	PATH="$(abspath $(BIN)):$$PATH" bash .ci/security-scan.sh .

secrets-baseline: install ## Refresh .secrets.baseline (keeps audit labels); review with detect-secrets audit
	$(BIN)/detect-secrets scan --all-files --baseline .secrets.baseline

audit: install ## pip-audit --strict of the runtime dependencies (needs the PyPI JSON API)
	$(BIN)/python .ci/runtime_deps.py --format requirements > $(VENV)/runtime-requirements.txt
	$(BIN)/pip-audit --strict --vulnerability-service pypi --disable-pip --no-deps \
		--progress-spinner off -r $(VENV)/runtime-requirements.txt

licenses: install ## Fail if a runtime dependency has a license outside the allow-list
	$(BIN)/python .ci/runtime_deps.py --check-licenses .ci/license-allowlist.txt

sbom: install ## CycloneDX SBOM of the installed environment -> sbom.cdx.json
	$(BIN)/cyclonedx-py environment --output-reproducible --of JSON -o sbom.cdx.json $(BIN)/python

docs: install ## Build the documentation site with mkdocs --strict (offline) into site/
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: install ## Serve the docs on 127.0.0.1:8000 with live reload
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

build: install ## Build the wheel and sdist into dist/ and check them with twine
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

bench: install ## Run the benchmarks (BENCHMARKS="moe_layer train_step") -> bench-results/*.json
	@if [ -z "$(strip $(BENCHMARKS))" ]; then echo "error: no benchmark scripts in benchmarks/" >&2; exit 2; fi
	mkdir -p $(BENCH_DIR)
	for b in $(BENCHMARKS); do \
		echo "== benchmarks/$$b.py"; \
		$(BIN)/python benchmarks/$$b.py $(BENCH_ARGS) --out $(BENCH_DIR)/$$b.json; \
	done

bench-compare: BENCH_ARGS = --quick
bench-compare: export MOE_LAB_BENCH_NO_APPEND = 1
bench-compare: bench ## Quick benchmarks, then fail on a ratio regression against benchmarks/baseline.json
	$(BIN)/python benchmarks/compare.py --baseline benchmarks/baseline.json \
		$(if $(BENCH_THRESHOLD),--threshold $(BENCH_THRESHOLD)) $(addprefix $(BENCH_DIR)/,$(addsuffix .json,$(BENCHMARKS)))

bench-baseline: BENCH_ARGS = --quick
bench-baseline: export MOE_LAB_BENCH_NO_APPEND = 1
bench-baseline: bench ## Refresh benchmarks/baseline.json from a quick run (review the diff before committing)
	$(BIN)/python benchmarks/compare.py --baseline benchmarks/baseline.json --update \
		$(addprefix $(BENCH_DIR)/,$(addsuffix .json,$(BENCHMARKS)))

workflows-lint: install ## actionlint (jactionlint) + shellcheck + JSON schemas of workflows and dependabot
	PATH="$(abspath $(BIN)):$$PATH" bash .ci/lint-workflows.sh .

docker-lint: install ## hadolint on deploy/docker/Dockerfile (if present)
	@if [ -f "$(DOCKERFILE)" ]; then $(BIN)/hadolint $(DOCKERFILE); \
	else echo "no $(DOCKERFILE): nothing to lint"; fi

pre-commit: install ## Run every pre-commit hook on all files
	$(BIN)/pre-commit run --all-files

clean: ## Remove build outputs and caches (keeps .venv and runs/)
	rm -rf build dist site $(BENCH_DIR) sbom.cdx.json coverage.xml .coverage htmlcov \
		.pytest_cache .mypy_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
