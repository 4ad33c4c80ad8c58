# The README's commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export KERAS_BACKEND := tensorflow

.PHONY: setup test demo lab report bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name tlopt --display-name "tlopt (Python 3)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/tlopt run params/demo.yaml --name demo --replace

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1

report: setup
	@test -n "$(RUN)" || { echo "usage: make report RUN=results/<run>"; exit 2; }
	$(VENV)/bin/tlopt report $(RUN)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
