# fastattrec: the two commands of the README, and helpers.
#   make demo   set up .venv, then synth -> prep -> train -> evaluate on synthetic data
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: demo test lint gpu-wheels bench-cpu clean

# torch is pinned so a fresh machine installs the CPU build of torch 2.13.0 (from local
# disk where available) instead of a multi-GB CUDA build; GPU users install a CUDA build
# of the same version first, then `pip install -e .`.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fastattrec synth -o $(DEMO)/ratings.dat --users 1000 --items 2000 --interactions 100000 --seed 0 --force
	$(BIN)/fastattrec prep $(DEMO)/ratings.dat -o $(DEMO)/data --force
	$(BIN)/fastattrec train $(DEMO)/data -o $(DEMO)/run --epochs 20 --eval-every 5 --force
	$(BIN)/fastattrec evaluate $(DEMO)/run

test: $(BIN)/.installed
	$(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# Wheels for a lent GPU machine without internet (see benchmarks/gpu_check.sh).
gpu-wheels: $(BIN)/.installed
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl polars==$$($(BIN)/python -c "import polars; print(polars.__version__)") \
	  polars-runtime-32==$$($(BIN)/python -c "import polars; print(polars.__version__)")
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .

bench-cpu: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_prep.py
	$(BIN)/python benchmarks/bench_train.py --device cpu --size ml-100k --epochs 5 --repeats 3

clean:
	rm -rf $(DEMO) build dist *.egg-info .pytest_cache results
