# Quickstart: `make demo` (tune + invert + sample on the embedded tiny model) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .stamps/install

.PHONY: install test test-slow test-all demo bench clean

install: $(STAMP)

# Idempotent: re-runs only when the requirement files change. The parity extra (PyTorch CPU + diffusers) is
# test-only; if it cannot be installed the parity tests skip and say why.
$(STAMP): requirements.txt requirements-parity.txt setup.py
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-parity.txt || echo "NOTE: parity extra (torch, diffusers) not installed; parity tests will skip"
	$(PIP) install -q --no-deps -e .
	@mkdir -p .stamps && touch $(STAMP)

# `make test` is the suite a change is checked with (a few minutes); the slow tier (tests/conftest.py SLOW_TESTS:
# msrun, LOVEU, the Ascend emulation's compiled graphs, large graph-mode parity) runs in `make test-slow`, and CI
# runs both (.ci/run). `make test` spreads the files over one worker process per core (TEST_WORKERS=1: one process).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
test: install
	$(PYTHON) -m pytest -q tests -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test-slow: install
	$(PYTHON) -m pytest -q tests -m slow

test-all: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) tools/demo.py

bench: install
	$(PYTHON) bench/run.py --config small

clean:
	rm -rf .stamps demo_outputs .pytest_cache

# The web app extra (requirements-app.txt), installed with the current numpy/transformers/huggingface_hub/torch
# pinned so that Gradio's requirements cannot move them.
APP_STAMP := .stamps/app
APP_CONSTRAINTS := .stamps/app-constraints.txt
.PHONY: app test-ui
$(APP_STAMP): requirements-app.txt $(STAMP)
	@mkdir -p .stamps
	$(PIP) freeze | grep -iE '^(numpy|transformers|huggingface[-_]hub|torch)==' > $(APP_CONSTRAINTS) || true
	$(PIP) install -q -r requirements-app.txt -c $(APP_CONSTRAINTS)
	@touch $(APP_STAMP)

app: $(APP_STAMP)
	$(PYTHON) tools/app.py

# The browser test: Debian's chromium and chromedriver (installed here when missing), then tests/ui/ only.
test-ui: $(APP_STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)
	TAV_UI_TEST=1 $(PYTHON) -m pytest -q tests/ui
