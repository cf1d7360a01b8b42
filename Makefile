# Two entry points for a fresh machine (Python 3.11, no GPU): `make demo` (the run, then its
# report in out/demo/report) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned as a matched pair that exists on this machine (see README);
# the package itself declares open ranges for GPU users.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/.installed

demo: install
	$(BIN)/catbatch submit manifests/demo.yaml
	$(BIN)/catbatch report out/demo

# The suite runs with a fresh, empty preset cache: CI sees what a new machine sees.
test: install
	$(BIN)/ruff check catbatch tests bench jobs
	sh scripts/ensure-chromium.sh
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
		CATBATCH_CACHE="$$cache" $(BIN)/pytest -q -n 2 --durations=25

lint: install
	$(BIN)/ruff check catbatch tests bench jobs
	$(BIN)/ruff format --check catbatch tests bench jobs
