# make train: set up .venv if missing, then train the default model (n-gram MLP on the names)
# make test:  the same set-up, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the offline data mirror beside the checkout, when there is one (docs/data.md)
export GENLAB_DATA_MIRROR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: setup train test test-slow benchmark gpu-check tensorboard clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# the slow end-to-end tests (torch.compile); CI runs them after make test
test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

benchmark: setup
	$(PY) scripts/benchmark.py $(ARGS)

# on one CUDA GPU, offline: the notebook GPT (eager and compiled) and DCGAN, a few hundred updates
# each; tokens/s, MFU, images/s, peak memory (scripts/gpu_check.py). Without CUDA: one line, exit 1
gpu-check: setup
	$(PY) scripts/gpu_check.py

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf outputs
