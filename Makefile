# Two commands do everything on a fresh machine (Python 3.11, pip, node/npm):
#   make run    set up what is missing, then run the main experiment through Flower
#   make test   set up what is missing, fetch MNIST, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_CONFIG ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

# torch/torchvision are pinned first so that nothing later resolves to another (multi-GB) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/byzflower run --run-config "$(RUN_CONFIG)"

test: setup
	$(BIN)/byzflower data fetch mnist
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
