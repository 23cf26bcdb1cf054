"""Reading checkpoints with clear errors: not a checkpoint, truncated, or from another model."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch

from genlab.errors import CheckpointError
from genlab.runs import checkpoint_file


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
    return checkpoint


def model_class(checkpoint: dict):
    return hydra.utils.get_class(checkpoint["genlab"]["class"])


def load_model(path: str | Path, map_location="cpu"):
    """The model of a checkpoint, from the checkpoint alone (its class, sizes and vocabulary)."""
    checkpoint = read_checkpoint(path)
    cls = model_class(checkpoint)
    model = cls.load_from_checkpoint(checkpoint["path"], map_location=map_location, weights_only=False)
    return model, checkpoint
