# Quickstart: `make demo` and `make test`. Each creates .venv and installs everything on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lthfast-installed
# A broken C++ build must fail loudly in demo/test/CI; plain `pip install .` only warns.
export LTHFAST_REQUIRE_EXT ?= 1

.PHONY: venv demo test test-fast bench bench-deps lint format clean
venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# On a CUDA machine the normal torch build; elsewhere the CPU build these machines hold offline.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.4"; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import lthfast, lthfast._backend as b; assert b.ext_loaded() or '$(LTHFAST_REQUIRE_EXT)' != '1', 'lthfast._C did not load'"
	touch $@

demo: $(STAMP)
	$(PY) -m lthfast demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-only --benchmark-group-by=group

# Optional peers for `lthfast bench --providers ...,sparseprop` (not in the default install, nor in CI).
# SparseProp compiles C++ (AVX2, OpenMP) against the torch already installed, hence --no-build-isolation.
bench-deps: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation sparseprop

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build dist *.egg-info lthfast/_C*.so .pytest_cache .ruff_cache $(STAMP)
