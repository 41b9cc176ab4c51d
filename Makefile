# `make train` and `make test` set up whatever is missing (virtual env, package in editable mode) first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; on a GPU box use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test services ui bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $@

train: install
	$(PY) train.py $(ARGS)

# Debian packages the tests' own servers need (PostgreSQL, Chromium); a no-op when present.
services:
	bash .ci/services.sh

test: install services
	$(PY) -m pytest $(PYTEST_ARGS)

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs/*/ multirun/*/ .cache
