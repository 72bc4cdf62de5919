# Two commands do all the set-up on a fresh machine:
#   make test   # create .venv, install, run the test suite
#   make demo   # create .venv, install, run the demo on the embedded default (local, CPU)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

# torch first: `torch==2.13.0` takes the CPU wheel on CPU machines (a CUDA build from PyPI on GPU
# nodes); installing it before the rest keeps pip from choosing another torch for deepspeed/peft.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/llava-platform demo --workdir demo_run

clean:
	rm -rf $(VENV) demo_run .pytest_cache
