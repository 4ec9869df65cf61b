# recserve developer commands. `make serve` and `make test` work on a fresh
# clone with Python >= 3.11 and a C compiler: they install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
WORKDIR ?= var
PYTEST_ARGS ?= -q

.PHONY: install build proto test serve bench lint format clean

$(STAMP): setup.py pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "recserve needs Python >= 3.11 (set PY=python3.11)")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The test-only extras (pyspark, for the Spark round trip), apart from `make serve`'s install.
TEST_STAMP := $(VENV)/.test-extras-stamp
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q 'pyspark>=3.5'
	@touch $(TEST_STAMP)

install: $(STAMP)  ## create .venv and install recserve (editable) with dev tools

build: $(STAMP)  ## rebuild the Cython kernels and the gRPC stubs in place
	$(BIN)/python setup.py -q build_ext --inplace

proto: $(STAMP)  ## regenerate server/v1/*_pb2*.py (recserve.v1) from proto/
	$(BIN)/python -c 'import setup; setup.generate_stubs()'

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: build $(TEST_STAMP)  ## run the test suite (installs the test-only extras once)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

serve: build  ## make the default dataset and models, then serve them over gRPC (Ctrl-C stops)
	$(BIN)/recserve quickstart --workdir $(WORKDIR)
	$(BIN)/recserve serve --config $(WORKDIR)/recserve.toml

bench: build  ## the serving benchmark on ml-100k, then the data-layer scale benchmark (20M events)
	$(BIN)/python bench/bench_service.py --skip-synthetic
	$(BIN)/python bench/bench_data.py

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove build products (keeps .venv and var/)
	rm -rf build dist *.egg-info server/v1 .pytest_cache .ruff_cache .hypothesis
	rm -f kernels/*.c kernels/*.so kernels/*.html
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
