# Two commands do all the set-up on a fresh machine:
#   make test   # create .venv, install (and Debian's chromium for the browser tests), run the test suite
#   make demo   # create .venv, install, run the demo on the embedded default (local, CPU)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser test demo clean

setup: $(STAMP) browser

# torch first: `torch==2.13.0` takes the CPU wheel on CPU machines (a CUDA build from PyPI on GPU
# nodes); installing it before the rest keeps pip from choosing another torch for deepspeed/peft.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The chat page's browser tests drive Debian's Chromium through Playwright (no browser download);
# installed here where missing (as root, or with sudo).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	fi

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(BIN)/llava-platform demo --workdir demo_run

clean:
	rm -rf $(VENV) demo_run .pytest_cache
