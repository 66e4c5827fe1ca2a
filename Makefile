# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up (make setup) on a
# fresh machine. `make help` lists every target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint repro params clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install the pinned dependencies (requirements.lock)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	touch $@

demo: setup ## Run the whole pipeline offline on a tiny GPT-2 (about 2 minutes on 2 CPU cores)
	$(BIN)/python -m pipeline.demo

test: setup lint ## Run the linter and the test suite, offline
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

lint: setup ## ruff over pipeline/ and tests/
	$(BIN)/ruff check pipeline tests

repro: setup ## The real job: dvc repro (needs the Hugging Face Hub; a GPU is recommended)
	$(BIN)/dvc repro

params: setup ## Check params.yaml and print every parameter with its help
	$(BIN)/python -m pipeline.config --help-params
	$(BIN)/python -m pipeline.config

clean: ## Remove the demo workspace and caches (not .venv, not DVC outputs)
	rm -rf .demo .pytest_cache
	find . -name __pycache__ -not -path './.venv/*' -exec rm -rf {} +
