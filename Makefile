# make help lists the targets. make train: set up .venv if missing, then train the default model
# (the n-gram MLP on the names); make test: the same set-up, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the offline data mirror beside the checkout, when there is one (docs/data.md)
export GENLAB_DATA_MIRROR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: help setup train test test-slow test-cluster benchmark benchmark-table gpu-check reproduce report tensorboard clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install genlab with its test dependencies

train: setup ## set up, then train (default: the n-gram MLP on the names); ARGS="experiment=..." for Hydra overrides
	$(PY) train.py $(ARGS)

test: setup ## set up, then run the test suite (the slow tests apart)
	$(PY) -m pytest -q $(ARGS)

test-slow: setup ## the slow end-to-end tests (torch.compile); CI runs them after make test
	$(PY) -m pytest -q -m slow $(ARGS)

# against a real scheduler (root; Debian's slurm-wlm, slurmdbd, mariadb-server, munge, postgresql and
# iproute2, installed when missing): a two-node SLURM with accounting (network namespaces as hosts) and
# a PostgreSQL server, started for the checks and stopped after them (tests/cluster/run.sh): a sweep,
# torchrun and sbatch+srun across both nodes, pre-empted and requeued; a failed job; Optuna workers
$(VENV)/.cluster: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,cluster]'
	touch $@

test-cluster: $(VENV)/.cluster ## as root: the checks on a two-node SLURM and a PostgreSQL it starts (docs/distributed.md)
	PYTHON=$(PY) tests/cluster/run.sh $(ARGS)

benchmark: setup ## genlab against a plain PyTorch loop of the same model (ARGS="model=gpt"; docs/performance.md)
	$(PY) scripts/benchmark.py $(ARGS)

benchmark-table: setup ## every CPU row of docs/performance.md at this commit, written into the page (minutes)
	$(PY) scripts/benchmark.py --table $(ARGS)

# offline, a few hundred updates each (scripts/gpu_check.py). Without CUDA: one line, exit 1
gpu-check: setup ## on one CUDA GPU: the notebook GPT and DCGAN, tokens/s, MFU, images/s, memory
	$(PY) scripts/gpu_check.py

# one multirun per group of presets into outputs/reproduce/<commit>/, then its report.html; run again,
# it continues there. ARGS="quick=true": a few updates each; ARGS="hydra/launcher=slurm": on a cluster
reproduce: setup ## every course experiment (MLP and WaveNet over 3 seeds), then report.html (ARGS="quick=true"; docs/sweeps.md)
	$(PY) scripts/reproduce.py $(ARGS)

report: setup ## one HTML page from a sweep or runs: make report ARGS=outputs/multirun/<date>/<time>
	$(PY) scripts/report.py $(ARGS)

tensorboard: setup ## TensorBoard on outputs/ (every run and sweep)
	$(VENV)/bin/tensorboard --logdir outputs

clean: ## delete outputs/ (every run)
	rm -rf outputs

# make help: each target with the text after its ##
help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | expand -t 14
