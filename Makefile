# Two entry points: `make run` (install + default pipeline) and `make test` (install + all tests).
PYTHON ?= python3
VENV   := .venv
CORES  ?= 2
ARGS   ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -e ".[test]"  # .pyc written on first import: half the install time
	touch $@

.PHONY: install run test test-fast bench
install: $(VENV)/.installed

# The local profile reruns outputs a killed run left incomplete; a lock left by a killed run is
# released first, unless another snakemake is really running on this project.
run: install
	$(if $(shell pgrep -f "[s]nakemake .*--profile workflow/profiles/local"),,\
		-@$(VENV)/bin/snakemake --profile workflow/profiles/local --unlock -q >/dev/null 2>&1)
	$(VENV)/bin/snakemake --profile workflow/profiles/local --cores $(CORES) $(ARGS)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow" $(ARGS)

bench: install
	$(VENV)/bin/python benchmarks/generation.py $(ARGS)
