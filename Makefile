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
	$(BIN)/remdr-sim --compare-centralized --reference concat --out runs/sim

# The fast tier runs one pytest-xdist worker per core (at most 4): its one federation spends most
# of its time waiting on Flower's polls, while the other worker trains. The slow tier runs its
# end-to-end deployments one at a time.
WORKERS := $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)

# pytest exits 5 when it selected no test: that is a failure here, never a silent pass.
PYTEST = rc=0; $(BIN)/python -m pytest -q $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest selected no tests ($(1))" >&2; exit 1; fi; exit $$rc

test: install
	@$(call PYTEST,-m 'not slow' -n $(WORKERS) --dist worksteal)

test-e2e: install
	@$(call PYTEST,-m slow)

test-all: test test-e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
