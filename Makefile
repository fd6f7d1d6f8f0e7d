# The two front-door commands: `make quickstart` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tlcompile-installed

.PHONY: quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev,sweep,dicom,fhir,tracking]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tlcompile build recipes/quickstart.yaml

# One pytest process per core, at most 4 (pytest-xdist; PYTEST_XDIST_AUTO_NUM_WORKERS=N overrides), each test file
# in one process so a module's fixtures are made once. `$(PY) -m pytest ...` alone runs in this process, for debugging.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# Everything, including tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# ruff (style, line length 120, unused imports and variables), ruff format, the import contracts in pyproject.toml
# (lint-imports: the clinic-box half never imports the build half or torch; no cycles), and vulture (unused code).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

clean:
	rm -rf runs .pytest_cache
