# Quickstart: `make demo` (tune + invert + sample on the embedded tiny model) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .stamps/install

.PHONY: install test demo bench clean

install: $(STAMP)

# Idempotent: re-runs only when the requirement files change. The parity extra (PyTorch CPU + diffusers) is
# test-only; if it cannot be installed the parity tests skip and say why.
$(STAMP): requirements.txt requirements-parity.txt setup.py
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-parity.txt || echo "NOTE: parity extra (torch, diffusers) not installed; parity tests will skip"
	$(PIP) install -q --no-deps -e .
	@mkdir -p .stamps && touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) tools/demo.py

bench: install
	$(PYTHON) bench/run.py --config small

clean:
	rm -rf .stamps demo_outputs .pytest_cache
