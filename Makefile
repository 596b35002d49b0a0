# The two commands of the course (see README.md):
#   make course   set up .venv if needed, then run every notebook on the tiny profile
#   make test     set up .venv if needed, then run the test suite
# Set-up is idempotent: it reinstalls only when pyproject.toml changed.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.medkit-setup
PROFILE ?= tiny
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: setup course test test-fast clean-outputs strip-notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing medkit and its CPU dependencies into $(VENV) (torch 2.13.0 CPU wheel)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name medkit --display-name "medkit (.venv)" >/dev/null
	@touch $(STAMP)
	@echo "setup: done"

course: setup
	$(PY) -m medkit.run --profile $(PROFILE) $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

strip-notebooks: setup
	$(PY) -m medkit.nbtools strip notebooks/*.ipynb

clean-outputs:
	rm -rf outputs/runs outputs/latest outputs/cache
