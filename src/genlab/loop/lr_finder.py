"""``tune_lr=true``: the notebook's learning-rate search before training, with Lightning's LR finder."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from genlab.run.checkpoints import trainer_plugins
from genlab.errors import ConfigError, instantiate
from genlab.results.figures import plt, save_figure
from genlab.run.runtime import choice


def find_learning_rate(cfg: DictConfig, datamodule, model) -> tuple[float, dict]:
    """Lightning's LR finder on ``model``, a fresh copy of the one to train (the notebook's search over
    10^-3 .. 10^0): the rate grows exponentially, one update per step (its fit gets the data's plain
    batches, one per update), until the loss blows up. Runs
    before the run folder is claimed (the rate is part of the run's plan), so its scratch files go to a
    temporary folder. Returns the suggested rate and the search's curve (``plot_search``)."""
    from lightning.pytorch.tuner import Tuner

    if model.kind != "text" or not model.hparams.get("optimizer"):
        raise ConfigError(f"tune_lr=true searches the learning rate of a language model's optimizer; "
                          f"model={choice('model')} has none to search")
    search = cfg.lr_finder
    with tempfile.TemporaryDirectory(prefix="genlab-lr-find-") as scratch:
        # the finder saves and restores the model around its search: through genlab's checkpoint files
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                              plugins=trainer_plugins(cfg.trainer, scratch),
                              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                              default_root_dir=scratch)
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=search.min_lr, max_lr=search.max_lr,
                                        num_training=search.num_training, update_attr=False)
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise ConfigError(f"the LR finder found no rate where the loss falls fast; widen lr_finder.min_lr/max_lr "
                          f"or raise lr_finder.num_training (now {search.num_training})")
    return float(suggestion), {"lr": list(finder.results["lr"]), "loss": list(finder.results["loss"])}


def plot_search(search: dict, suggestion: float, run_dir: Path) -> Path:
    """``lr_find.png`` in the run folder (once it is the run's): loss against log10 of the rate."""
    path = run_dir / "lr_find.png"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([math.log10(lr) for lr in search["lr"]], search["loss"], lw=1)
    ax.axvline(math.log10(suggestion), color="red", ls="--", label=f"suggested lr = {suggestion:.3g}")
    ax.set(xlabel="log10(learning rate)", ylabel="training loss (smoothed)", title="Learning-rate search")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    print(f"LR finder: suggested learning rate {suggestion:.4g} (plot: {path})")
    return path
