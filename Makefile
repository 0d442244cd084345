# Quick start:  make run   (set up, then train the default experiment)
#               make test  (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The tests also need torch (CPU) and transformers, as references for fmjax.convert, and
# lm-eval, to check fmjax's model type in it against fmjax.eval.
$(VENV)/.installed-hf: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,hf,eval]'
	touch $@

run: setup
	$(PY) -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny

# Two worker processes, each taking whole test files (their module fixtures compile once).
test: $(VENV)/.installed-hf
	$(PY) -m pytest -q -n 2 --dist loadfile
