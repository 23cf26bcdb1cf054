"""What the running command is: its Hydra choices and overrides, whether it is a sweep job, which
launcher runs it, and whether this process is the first of a distributed run. Outside Hydra
(tests that compose a config by hand) every question has a plain answer. And the machine it runs
on: the CPU threads it uses, and a CUDA check that only costs time where there is no driver."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def hydra_config():
    """Hydra's own config of the running job, or None when not running under Hydra."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def choice(group: str) -> str:
    """The option chosen for a config group (``model=mlp`` -> "mlp"), for messages."""
    hydra = hydra_config()
    return (hydra.runtime.choices.get(group) if hydra else None) or "?"


def task_overrides() -> list[str]:
    """The command line's overrides (empty when not running under Hydra)."""
    hydra = hydra_config()
    return list(hydra.overrides.task) if hydra else []


def in_sweep() -> bool:
    """True in a job of ``-m`` (a grid sweep or an Optuna study)."""
    hydra = hydra_config()
    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def launcher_target() -> str:
    """The class of the sweep's launcher ("" outside a sweep)."""
    hydra = hydra_config()
    return str(hydra.launcher.get("_target_", "")) if hydra else ""


def is_first_process() -> bool:
    """False in the processes that a distributed run adds (Lightning's DDP launcher, torchrun,
    SLURM tasks, other nodes): only the first owns the run folder."""
    return all(int(os.environ.get(name, 0) or 0) == 0
               for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


# --- the machine: threads, and a check that only costs time ---------------------------------------
def set_threads(cfg: DictConfig) -> None:
    """``threads=N``, or under the parallel launcher an equal share of the cores for each job
    (n_jobs processes each using every core would only fight over them)."""
    threads = cfg.get("threads")
    if threads is None and in_sweep() and "joblib" in launcher_target().lower():
        n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
        cores = os.cpu_count() or 1
        threads = max(1, cores // (cores if n_jobs < 0 else n_jobs))
    if threads:
        torch.set_num_threads(int(threads))


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_failing_nvml_check() -> None:
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1: torch then asks NVML (the NVIDIA
    driver's library) whether a GPU exists, which does not initialise CUDA. Where NVML cannot be
    loaded (no NVIDIA driver: a CPU machine with torch's CUDA build), torch tries to load it again
    at every such check, then asks the CUDA runtime all the same, as without the variable. Adam and
    AdamW check before every update, which then costs a sizeable share of a small model's update
    (docs/performance.md). There the variable changes no answer and only costs time: unset it."""
    if os.environ.get(NVML_CHECK) != "1":
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the name torch loads
    except OSError:
        del os.environ[NVML_CHECK]
