# The two front-door commands: `make quickstart` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tlcompile-installed

.PHONY: quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[train,dev,sweep,dicom,fhir,tracking]'
	@# pip compiles the installed files to bytecode on one core (80 s of a 171 s install, 2-core AMD EPYC, AVX2
	@# only); compileall uses every core. A file some package ships for another Python version fails to compile:
	@# harmless (pip skips those too), so the exit status is not checked. Left out: the test suites packages ship
	@# (tests/ and test/ folders, 13% of the source) and pip, which nothing imports when tlcompile or its tests run
	@# (59 -> 48 s, 2-core AMD EPYC, AVX2 only); a module left out still works, compiled when it is imported.
	@# tlcompile itself too: installed editable, pip compiles none of it, and where PYTHONDONTWRITEBYTECODE is set every
	@# `tlcompile predict` compiled its modules again (0.71 -> 0.60 s a call on a 2-core AVX-512 AMD EPYC).
	$(PY) -m compileall -q -j 0 -x '/(tests?|pip)/' $(VENV)/lib tlcompile >/dev/null 2>&1 || true
	@# tlcompile's one-pass fake quantization for QAT (tlcompile/compress/fused_fq.c, about a second with a C compiler):
	@# built now so that a missing compiler is said at install time, not found in the middle of a build.
	$(PY) -c "import sys; from tlcompile.compress import fused_fq; sys.exit(fused_fq.load() is None)" >/dev/null 2>&1 \
	|| echo "tlcompile's fused fake-quantization kernel was not built here (no C compiler?): quantization-aware" \
	"training will use NNCF's slower functions"
	@# The preprocessing's field search, crop and resize (tlcompile/runtime/fast_preprocess.c, the same results): likewise.
	$(PY) -c "import sys; from tlcompile.runtime import fast_preprocess as f; sys.exit(f._library() is None)" \
	>/dev/null 2>&1 || echo "tlcompile's preprocessing kernels were not built here (no C compiler?): predict and" \
	"training will preprocess with numpy and Pillow (the same pixels, slower)"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tlcompile build recipes/quickstart.yaml

# One pytest process per core this process may use, at most 4 (pytest-xdist; `make test TEST_WORKERS=1` for one), each
# test file in one process so a module's fixtures are made once. `$(PY) -m pytest ...` alone runs in one process.
# (xdist's own `-n auto` counts physical cores: 1 on a 2-vCPU VM whose vCPUs are one core's hyperthreads.)
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 1)

# NNCF's own C++ fake-quantization kernels for the CPU: the reference tests/compress/test_fused_fq.py holds the fused
# kernel to (bit-identical outputs). Builds never need them now (every QAT call of the model zoo takes the fused
# kernel), so they are compiled for the tests only, once per venv (~55 s, 2-core AMD EPYC, AVX2).
# torch keeps compiled extensions in ~/.cache/torch_extensions by default, one build per extension for the whole user:
# a second clone's venv (CI, a colleague's checkout) rebuilt it for its own include paths, and the next `make test`
# here compiled it again (53.6 s of a 204.5 s run, 2-core AVX-512 AMD EPYC). Kept inside the venv, the build matches
# its stamp and goes when the venv does. tests/conftest.py sets the same default for a bare `pytest`.
TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_EXTENSIONS_DIR
NNCF_KERNELS := $(TORCH_EXTENSIONS_DIR)/.nncf-kernels

$(NNCF_KERNELS): $(STAMP)
	$(PY) -c "import sys; from tlcompile.compress.quantize import import_nncf; import_nncf(); \
	from nncf.torch.quantization.extensions import QuantizedFunctionsCPU as K; \
	from nncf.torch.quantization.reference import ReferenceQuantizedFunctions as R; \
	sys.exit(K.get('Quantize_forward') is R.Quantize_forward)" \
	>/dev/null 2>&1 || echo "NNCF's CPU kernels were not compiled here (no C++ compiler?); the tests that compare" \
	"the fused kernel with them will try again"
	mkdir -p $(TORCH_EXTENSIONS_DIR) && touch $(NNCF_KERNELS)

test: $(NNCF_KERNELS)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Everything, including tests marked slow.
test-all: $(NNCF_KERNELS)
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
