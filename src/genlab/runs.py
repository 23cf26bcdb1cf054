"""Where a run writes, and which checkpoint a resumed run continues from.

``ckpt_path`` may be a checkpoint file, a run folder, or ``last`` (the newest run of the same
model and data). A resumed run writes into the folder of the run it continues, so its
TensorBoard curves, checkpoints and ``metrics.json`` stay together. Hydra picks the run folder
before any code runs, so ``conf/hydra/default.yaml`` asks the ``genlab_run_dir`` resolver."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from genlab.errors import CheckpointError

RUNS = Path("outputs/runs")


def checkpoint_file(ckpt_path: str, model: str = "?", data: str = "?") -> Path:
    """The checkpoint a ``ckpt_path`` setting names."""
    if ckpt_path == "last":
        candidates = sorted(RUNS.glob(f"{model}-{data}/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"ckpt_path=last: no earlier run of model={model} data={data} under {RUNS}/")
        return candidates[-1]
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no checkpoint at {path}; give a .ckpt file, a run folder or last")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/<name>.ckpt -> <run>."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resolve_run_dir(ckpt_path, model: str, data: str, fresh: str) -> str:
    """The run folder: the resumed run's own, or ``fresh`` for a new run."""
    if ckpt_path in (None, "", "None", "null"):
        return fresh
    try:
        return str(run_dir_of(checkpoint_file(str(ckpt_path), model, data)))
    except CheckpointError:
        return fresh  # train() reports the problem with the full message


OmegaConf.register_new_resolver("genlab_run_dir", resolve_run_dir, replace=True)


def flatten(node: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys: {"model": {"n_embd": 10}} -> {"model.n_embd": 10}."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
