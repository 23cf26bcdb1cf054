"""What the running command is: its Hydra choices and overrides, whether it is a sweep job, which
launcher runs it, and whether this process is the first of a distributed run. Outside Hydra
(tests that compose a config by hand) every question has a plain answer."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
