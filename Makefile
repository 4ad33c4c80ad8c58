# The README's commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := $(VENV)/share/jupyter/kernels/tlopt/kernel.json
LAB_PORT ?= 8888
export TF_CPP_MIN_LOG_LEVEL ?= 2
export KERAS_BACKEND := tensorflow

.PHONY: setup test demo lab report bench clean

setup: $(STAMP) $(KERNEL)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The environment as the Jupyter kernel `tlopt` that the notebooks name, found by any Jupyter
# started from .venv (and by `jupyter kernelspec list`); its kernels run on TensorFlow's Keras.
$(KERNEL): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name tlopt --display-name "tlopt (Python 3)" \
		--env KERAS_BACKEND tensorflow --env TF_CPP_MIN_LOG_LEVEL 2

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

demo: setup
	$(VENV)/bin/tlopt run params/demo.yaml --name demo --replace

# JupyterLab on notebooks/, reachable from this machine only, behind a fresh token; the URL
# printed first holds it. On a remote machine: ssh -L $(LAB_PORT):127.0.0.1:$(LAB_PORT) <host>.
# As root (containers) Jupyter refuses to start without --allow-root.
lab: setup
	@export JUPYTER_TOKEN=$$($(PY) -c 'import secrets; print(secrets.token_hex(24))'); \
	echo "JupyterLab: http://127.0.0.1:$(LAB_PORT)/lab?token=$$JUPYTER_TOKEN"; \
	exec $(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 \
		--ServerApp.port=$(LAB_PORT) --ServerApp.port_retries=0 $(if $(filter 0,$(shell id -u)),--allow-root)

report: setup
	@test -n "$(RUN)" || { echo "usage: make report RUN=results/<run>"; exit 2; }
	$(VENV)/bin/tlopt report $(RUN)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
