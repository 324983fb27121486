# Two commands: `make sim` (set up + run the main job) and `make test` (set up + run the fast tests).
# `make test-e2e` runs the slow end-to-end tier, `make test-all` both tiers (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.remdr-installed

.PHONY: install sim test test-e2e test-all lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

sim: install
	$(BIN)/remdr-sim --compare-centralized --out runs/sim

# pytest exits 5 when it selected no test: that is a failure here, never a silent pass.
PYTEST = rc=0; $(BIN)/python -m pytest -q $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest selected no tests ($(1))" >&2; exit 1; fi; exit $$rc

test: install
	@$(call PYTEST,-m 'not slow')

test-e2e: install
	@$(call PYTEST,-m slow)

test-all: install
	@$(call PYTEST,)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
