# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedfhe run --dataset mnist-5k --clients 10 --rounds 5 --fhe-samples 100 --out runs/demo --force

test: $(STAMP) lint
	bash deploy/install-nginx.sh  # the two-replica test's load balancer (Debian's nginx-light), when missing
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
