# Two entry points: `make run` (install + default pipeline) and `make test` (install + all tests).
PYTHON ?= python3
VENV   := .venv
CORES  ?= 2
ARGS   ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install run test test-fast bench
install: $(VENV)/.installed

run: install
	$(VENV)/bin/snakemake --cores $(CORES) $(ARGS)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow" $(ARGS)

bench: install
	$(VENV)/bin/python benchmarks/generation.py $(ARGS)
