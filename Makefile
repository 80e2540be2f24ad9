# vlmq: `make demo` runs the main job end to end; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed


.PHONY: venv demo test test-unit chaos lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m demo

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15

test-unit: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/unit

# the soaks at full size (Redis broker, chaos, RabbitMQ): 2000 jobs each, workers SIGKILLed;
# chaos also kills, pauses and restarts Redis and resets worker connections (tests/proxy.py)
chaos: venv
	HF_HUB_OFFLINE=1 VLMQ_SOAK_JOBS=$${VLMQ_SOAK_JOBS:-2000} $(PY) -m pytest -q -s -p no:cacheprovider -m chaos

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
