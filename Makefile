# Two entry points, both self-contained on a fresh machine:
#   make demo   set up .venv, record the built-in training run, draw its Δ plot
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,dask,distributed,s3,lightning,hf]"
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/corrtools demo --overwrite  # replaces runs/demo.zarr only if it is a run store

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/recorder_overhead.py
	$(PY) benchmarks/analysis_throughput.py
	$(PY) benchmarks/sparse_step.py
