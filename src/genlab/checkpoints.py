"""Reading checkpoints with clear errors (not a checkpoint, truncated), and checking that a resume
can continue one (the same model, vocabulary and sizes, updates left to make)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import hydra
import torch

from genlab.errors import CheckpointError
from genlab.runs import checkpoint_file, run_dir_of
from genlab.runtime import choice


def read_checkpoint(path: str | Path) -> dict:
    path = checkpoint_file(str(path))  # a file or a run folder
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a cut-short zip, random bytes, an empty file, ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({err.__class__.__name__}: {str(err)[:120]}); it may be "
            "truncated by an interrupted copy or not a checkpoint at all. Use another one, e.g. "
            "checkpoints/best.ckpt of the same run."
        ) from None
    if not isinstance(checkpoint, dict) or "genlab" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a genlab checkpoint (no model class and weights in it).")
    checkpoint["path"] = str(path)
    checkpoint["renamed"] = upgrade_hyperparameters(checkpoint)
    return checkpoint


# hyper-parameters that changed name, old -> new: checkpoints written before still load and resume
RENAMED = {"contiguous": "sequential"}
RENAMED_IN = {"genlab.models.bigram.Bigram": {"context": "block_size"}}


def upgrade_hyperparameters(checkpoint: dict) -> bool:
    """Rename the hyper-parameters of an older checkpoint in place; True if one was renamed."""
    hparams = checkpoint.get("hyper_parameters") or {}
    renames = {**RENAMED, **RENAMED_IN.get(checkpoint["genlab"]["class"], {})}
    old = [key for key in renames if key in hparams]
    for key in old:
        hparams[renames[key]] = hparams.pop(key)
    return bool(old)


def model_class(checkpoint: dict):
    return hydra.utils.get_class(checkpoint["genlab"]["class"])


def load_model(path: str | Path, map_location="cpu"):
    """The model of a checkpoint, from the checkpoint alone (its class, sizes and vocabulary)."""
    checkpoint = read_checkpoint(path)
    cls = model_class(checkpoint)
    source = checkpoint["path"]
    if checkpoint["renamed"]:  # Lightning builds the model from the file's hyper-parameters: give it the renamed ones
        source = io.BytesIO()
        torch.save({k: v for k, v in checkpoint.items() if k not in ("path", "renamed")}, source)
        source.seek(0)
    model = cls.load_from_checkpoint(source, map_location=map_location, weights_only=False)
    return model, checkpoint


# model settings a resumed run may change: how it trains, not what the network is
TRAINING_SETTINGS = ("optimizer", "scheduler", "updates_per_step", "compile", "grad_clip")


def check_resume(checkpoint: dict, model, max_steps: int) -> None:
    """Refuse a checkpoint this command cannot continue: another model, vocabulary or size, or a
    run that has already trained every update asked for. Names what differs and what to do."""
    path = checkpoint["path"]
    saved_class = checkpoint["genlab"]["class"]
    wanted = f"{type(model).__module__}.{type(model).__qualname__}"
    if saved_class != wanted:
        raise CheckpointError(f"{path} holds a {saved_class.rsplit('.', 1)[-1]} model, but model={choice('model')} "
                              f"is a {wanted.rsplit('.', 1)[-1]}; pass the model= the checkpoint was trained with")
    saved = checkpoint.get("hyper_parameters", {})
    if saved.get("tokenizer") is not None and saved["tokenizer"] != model.hparams.get("tokenizer"):
        raise CheckpointError(f"{path} was trained on another vocabulary than data={choice('data')} gives; "
                              "resume with the data the run was started with")
    changed = [f"model.{key}={saved[key]!r} in the checkpoint but {model.hparams[key]!r} now"
               for key in sorted(set(saved) & set(model.hparams))
               if key not in (*TRAINING_SETTINGS, "tokenizer") and saved[key] != model.hparams[key]]
    if changed:
        raise CheckpointError(f"{path} was trained with other sizes than this command gives: {'; '.join(changed)}. "
                              "Resume with the settings the run was started with (its .hydra/overrides.yaml "
                              "lists them), or start a new run")
    step, folder = checkpoint["global_step"], run_dir_of(Path(path))
    completed = finished_at(folder) == step
    if model.single_pass and completed:
        raise CheckpointError(f"the run in {folder} is complete: a counting model makes one pass over the data, "
                              "so there is nothing to continue; start a new run instead")
    if max_steps > 0 and (step > max_steps or (step == max_steps and completed)):
        raise CheckpointError(
            f"the run in {folder} has finished: it trained {step:,} updates, and trainer.max_steps={max_steps} asks "
            f"for no more. To train it further raise trainer.max_steps, e.g. trainer.max_steps={2 * step}")


def finished_at(folder: Path) -> int | None:
    """The update count at which the run in ``folder`` completed (its metrics.json), else None."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics.get("steps") if isinstance(metrics, dict) and metrics.get("status") == "completed" else None
