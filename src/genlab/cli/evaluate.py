"""``python eval.py ckpt_path=...``: the loss of a checkpoint on its run's validation and test
splits (the run's own data config, read from ``<run>/.hydra/config.yaml`` through
``genlab.run.trust``), printed, then written to ``eval.json`` beside the run's ``metrics.json`` (or to
``out=``) where that folder can be written."""

from __future__ import annotations

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
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    result = {"checkpoint": str(path), "step": checkpoint.get("global_step"), "val_loss": val["loss/val"],
              "val_bpc": val["loss/val_bpc"], "test_loss": None, "test_bpc": None}
    if datamodule.has_test:
        test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        result.update(test_loss=test["loss/test"], test_bpc=test["loss/test_bpc"])
    shown = f"val {result['val_loss']:.4f}" + (f", test {result['test_loss']:.4f}" if result["test_loss"] else "")
    shown += f" nats per token; val {result['val_bpc']:.4f} bits per character"
    print(f"{shown} at step {result['step']} of {path}")
    out = Path(cfg.out) if cfg.out else run_dir / "eval.json"
    if save_result(lambda p: write_metrics(p, result), out, "the result", chosen=bool(cfg.out)):
        print(f"written to {out}")
    return result


@checked_command_line("eval")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
