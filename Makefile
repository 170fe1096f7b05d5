# Two entry points: `make demo` and `make test`; `make check` is the inner loop. All create .venv on first use.
# `make client` creates .venv-client instead: the partner's install (fedfhe predict; no torch), README.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CLIENT_VENV := .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed-stamp
# pytest-xdist workers: one per core of the 2-core CI machine
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(JOBS) --dist loadgroup
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install client demo test check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

client: $(CLIENT_STAMP)  # the partner's install: fedfhe predict without torch, Concrete ML, Flower or Ray (README)

$(CLIENT_STAMP): pyproject.toml requirements-client.txt
	test -x $(CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-client.txt
	$(CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(CLIENT_STAMP)

demo: $(STAMP)
	$(BIN)/fedfhe run --dataset mnist-5k --clients 10 --rounds 5 --fhe-samples 100 --out runs/demo --force

test: $(STAMP) lint
	bash deploy/install-nginx.sh  # the two-replica test's load balancer (Debian's nginx-light), when missing
	$(PYTEST)

check: $(STAMP) lint  # the gates and every test that needs no federation, no FHE keys and no server
	$(PYTEST) -m "not federation and not fhe and not server"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
