# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to releases that install together (and, on the dev machines, from local disk);
# torchaudio 2.11 declares no torch pin and runs beside them through the stable ABI.
TORCH := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
# pytest processes (pytest-xdist): one per core; every test runs single-threaded (tests/conftest.py)
TEST_PROCS ?= $(shell $(PY) -c 'import os; print(max(1, len(os.sched_getaffinity(0))))' 2>/dev/null || echo 2)

.PHONY: demo adapt test test-fast test-numerics lint format install install-dev clean

# --no-compile: pip would byte-compile all ~21,000 .py files of the dev extras (~50 s of one core here); Python
# compiles the modules a run imports, once, when it first imports them.
PIP := $(BIN)/pip install -q --no-compile

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/python -m mmformer.demos.digits

$(VENV)/.installed-adapt: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e ".[adapt]"
	touch $(VENV)/.installed $@

adapt: $(VENV)/.installed-adapt
	$(BIN)/python -m mmformer.demos.digits adapt

# The second pass of `make test`: the numerics-heavy tests (marker `numerics`) on other kernels than this CPU's own —
# MKL's CPU-independent code path and ATen's unvectorised kernels — so that a tolerance that only this CPU's rounding
# meets fails here, not on a user's machine with another CPU (both settings change float32 matmul, softmax and
# attention results bit for bit on the dev machines).
NUMERICS_ENV ?= MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default
NUMERICS_TESTS = $(shell grep -l "pytest.mark.numerics" tests/test_*.py)  # collect only the files that mark some

# Tests run with Python's bytecode cache on even where the machine turns it off (PYTHONDONTWRITEBYTECODE): every
# pytest worker and every process a test starts would otherwise compile mmformer's and the tests' sources again, and
# pytest rewrite every test module's asserts again (collection 16.4 → 13.0 s of CPU per process with the cache).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -q -n $(TEST_PROCS) --dist worksteal --durations=15
	$(NUMERICS_ENV) $(PYTEST) -q -n $(TEST_PROCS) -m "numerics and not slow" $(NUMERICS_TESTS)

# only the second pass (the numerics-heavy tests on other kernels)
test-numerics: $(VENV)/.installed-dev
	$(NUMERICS_ENV) $(PYTEST) -q -n $(TEST_PROCS) -m "numerics and not slow" $(NUMERICS_TESTS)

# the suite without the long end-to-end runs (marked slow): kill/resume, DDP, compiled decoding, benchmark smoke runs
test-fast: $(VENV)/.installed-dev
	$(PYTEST) -q -n $(TEST_PROCS) --dist worksteal -m "not slow" --durations=15

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
