"""``python eval.py ckpt_path=...``: the loss of a checkpoint on its run's validation and test
splits (the run's own data config, read from ``<run>/.hydra/config.yaml`` through
``genlab.run.trust``), printed, then written to ``eval.json`` beside the run's ``metrics.json`` (or to
``out=``) where that folder can be written."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.run.checkpoints import genlab_classes, load_model
from genlab.console import route_library_logs
from genlab.data.module import GenlabDataModule, ready
from genlab.errors import CheckpointError, ConfigError, exit_on_user_error, instantiate
from genlab.run.outputs import save_result, write_metrics
from genlab.cli.overrides import checked_command_line
from genlab.run.runs import checkpoint_file, run_dir_of
from genlab.run.runtime import CONF_DIR
from genlab.run.trust import build, read_config, resolved

log = logging.getLogger("genlab")

USAGE = ("usage: python eval.py ckpt_path=<run folder | .ckpt file | last> [accelerator=auto] [out=FILE]\n"
         "                      [model_class=null] [trust_checkpoint=false]")


def run_datamodule(run_dir: Path, cfg: DictConfig):
    """The data module the run trained with, reading data from this command's folders: built from
    the run's recorded config through the trust boundary (only genlab's own data modules), or as
    recorded with trust_checkpoint=true."""
    recorded = run_dir / ".hydra" / "config.yaml"
    if not recorded.exists():
        raise CheckpointError(f"{recorded} is missing: eval.py rebuilds the run's data from its recorded config, "
                              "so the checkpoint must stay inside its run folder (<run>/checkpoints/*.ckpt)")
    here = {"data_dir": cfg.paths.data_dir, "mirror": cfg.paths.data_mirror}
    if cfg.trust_checkpoint:
        data = OmegaConf.load(recorded).data
        with open_dict(data):
            data.update(here)
        return ready(instantiate(data))
    config = read_config(recorded)
    if isinstance(config.get("data"), dict):
        config["data"].update(here)
    data_modules = {name: cls for name, cls in genlab_classes("genlab.data", GenlabDataModule).items()
                    if cls is not GenlabDataModule}
    return ready(build(resolved(config, "data", recorded), data_modules, "data", recorded))


def evaluate(cfg: DictConfig) -> dict:
    route_library_logs()
    if not cfg.get("ckpt_path"):
        raise ConfigError(f"ckpt_path is missing: which checkpoint should be evaluated?\n{USAGE}")
    path = checkpoint_file(str(cfg.ckpt_path))
    model, checkpoint = load_model(path, trust=cfg.trust_checkpoint, named=cfg.model_class)
    if model.kind != "text":
        raise ConfigError(f"{path} holds a {type(model).__name__}, which has no validation or test loss; "
                          "eval.py measures language models (sample.py shows what an image model makes)")
    run_dir = run_dir_of(path)
    datamodule = run_datamodule(run_dir, cfg)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    result = {"checkpoint": str(path), "step": checkpoint.get("global_step"),
              **final_losses(trainer, model, datamodule)}
    shown = f"val {result['val_loss']:.4f}" + (f", test {result['test_loss']:.4f}" if result["test_loss"] else "")
    shown += f" nats per token; val {result['val_bpc']:.4f} bits per character"
    print(f"{shown} at step {result['step']} of {path}")
    out = Path(cfg.out) if cfg.out else run_dir / "eval.json"
    if save_result(lambda p: write_metrics(p, result), out, "the result", chosen=bool(cfg.out)):
        print(f"written to {out}")
    return result


def final_losses(trainer: L.Trainer, model, datamodule, validated: bool = False) -> dict:
    """A language model's final figures, for metrics.json and eval.json alike: the validation loss
    and bits per character, and the test's where the data has a test split, over what
    ``data.final_whole_split`` says (the whole splits, or the validations' fixed sample), with what
    each covers. ``validated``: the trainer's last validation (training's, after its last update)
    may stand for the final one, where it covered the same."""
    # data.final_whole_split: a scope given to this evaluation's loaders (the data module, built
    # before the plan was recorded, is not changed)
    scope = {"whole_split": True} if datamodule.final_whole_split else {}
    sampled = scope and not datamodule.evaluation_scope("val")["whole_split"]  # validations took a sample
    if not validated or sampled or "loss/val" not in trainer.callback_metrics:
        trainer.validate(model, dataloaders=datamodule.val_dataloader(**scope), verbose=False)
    metrics = {"val_loss": float(trainer.callback_metrics["loss/val"]), "test_loss": None,
               "val_bpc": float(trainer.callback_metrics["loss/val_bpc"]), "test_bpc": None}
    metrics.update(evaluation_scope(datamodule, "val", scope=scope))
    if datamodule.has_test:  # text data has a test split only when data.test_fraction > 0
        result = trainer.test(model, dataloaders=datamodule.test_dataloader(**scope), verbose=False)[0]
        metrics.update(test_loss=float(result["loss/test"]), test_bpc=float(result["loss/test_bpc"]))
        metrics.update(evaluation_scope(datamodule, datamodule.test_split, "test", scope))
    return metrics


def evaluation_scope(datamodule, split: str, name: str | None = None, scope: dict | None = None) -> dict:
    """``{name}_tokens`` and ``{name}_whole_split`` for metrics.json, and the same said in the log
    (``scope``: what the evaluation was given, ``{"whole_split": True}`` or nothing)."""
    scope = datamodule.evaluation_scope(split, **(scope or {}))
    if scope is None:  # a data module that evaluates whole splits and says nothing more
        return {}
    log.info("final %s loss over %s", name or split, scope["description"].split(": ", 1)[1])
    return {f"{name or split}_tokens": scope["tokens"], f"{name or split}_whole_split": scope["whole_split"]}


@checked_command_line("eval")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
