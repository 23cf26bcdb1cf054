"""What TensorBoard's HPARAMS tab shows for a run: every parameter of its config as a flat key, and
the losses as metrics.

Each run writes only its own session (the parameters it ran with); no run writes an "experiment"
(the list of columns), because TensorBoard would take the first one it finds as the columns of
every run. Without one, TensorBoard builds the columns from all runs in the folder, marks those
whose values differ between runs and shows them first: in a sweep, the swept parameters. The
metric columns are the runs' scalar curves (the last value of each), sorted by name: ``loss/*``
(best_val, test, train, val) come first."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from genlab.run.plan import flatten
from genlab.run.runtime import choice

GROUPS = ("data", "model", "optimizer", "scheduler", "trainer")
# keys that say how a run is wired, not what it trains: class paths and folders
INTERNAL_KEYS = {"_target_", "_partial_", "_convert_", "data_dir", "mirror"}


def run_hparams(cfg: DictConfig, world_size: int = 1) -> dict:
    """The config as flat key/values (lists become strings, null "null"), without internal keys;
    the chosen option of each group (``model=gpt`` -> model: gpt) stands for its class path."""
    container = OmegaConf.to_container(cfg, resolve=True)
    groups = {group: container.get(group) or {} for group in GROUPS}
    out = {group: choice(group) for group in GROUPS if container.get(group)}
    for name, value in flatten(groups).items():
        if name.rsplit(".", 1)[-1] not in INTERNAL_KEYS:
            out[name] = "null" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)
    # under DDP every process trains on its own batch: the batch an update averages over is
    # world_size times larger (the learning rate is the same everywhere: it is the global one)
    out.update({"trainer.world_size": world_size, "data.global_batch_size": cfg.data.batch_size * world_size,
                "seed": container["seed"], "val_every": container["val_every"],
                "name": container.get("name") or "null", "tags": ",".join(map(str, container.get("tags") or [])) or "null"})
    return out


@rank_zero_only  # the other processes of a distributed run have no writer
def log_hparams(loggers, hparams: dict, lr_figure=None) -> None:
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _, session_start, _ = hparams_summaries(hparams, {})  # the session only (see the docstring)
            logger.experiment.file_writer.add_summary(session_start)
        else:
            logger.log_hyperparams(hparams)
        if lr_figure is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("lr_find", np.asarray(Image.open(lr_figure).convert("RGB")), 0, dataformats="HWC")
