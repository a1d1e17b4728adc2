# The two commands of the README: `make up` runs the embedded stack, `make test` runs the whole suite.
# Both create the virtual environment when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test test-cluster lint typecheck bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Local function instances run isolated when the stack runs as root; the script installs what that needs.
up: $(STAMP)
	bash deploy/isolation-setup.sh
	$(BIN)/gpufn up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The Kubernetes tests need a local control plane and kubelet built from Debian's sources (cached after the
# first build in ~/.cache/gpufn); tests/cluster/build.sh installs and builds what is missing,
# tests/registry/setup.sh installs Debian's docker-registry and skopeo for the registry tests, and
# tests/cluster/images/build.sh builds the real node's container images (debootstrap + buildah, cached).
test-cluster:
	bash tests/cluster/build.sh
	bash tests/registry/setup.sh
	bash tests/cluster/images/build.sh

test: lint typecheck test-cluster
	bash deploy/isolation-setup.sh
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/invoke.py
	$(BIN)/python bench/autoscale.py
	$(BIN)/python bench/list_functions.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
