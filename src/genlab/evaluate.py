"""``python eval.py ckpt_path=...``: the loss of a checkpoint on its run's validation and test
splits (the run's own data config, read from ``<run>/.hydra/config.yaml``), printed and written to
``eval.json`` beside the run's ``metrics.json`` (or to ``out=``)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.checkpoints import genlab_classes, load_model
from genlab.console import route_library_logs
from genlab.errors import CheckpointError, ConfigError, exit_on_user_error, instantiate
from genlab.outputs import write_metrics
from genlab.overrides import checked_command_line
from genlab.runs import checkpoint_file, run_dir_of
from genlab.runtime import CONF_DIR

USAGE = ("usage: python eval.py ckpt_path=<run folder | .ckpt file | last> [accelerator=auto] [out=FILE]\n"
         "                      [model_class=null] [trust_checkpoint=false]")


def run_data_config(run_dir: Path, cfg: DictConfig) -> DictConfig:
    """The data config the run trained with, reading data from this command's folders."""
    recorded = run_dir / ".hydra" / "config.yaml"
    if not recorded.exists():
        raise CheckpointError(f"{recorded} is missing: eval.py rebuilds the run's data from its recorded config, "
                              "so the checkpoint must stay inside its run folder (<run>/checkpoints/*.ckpt)")
    data = OmegaConf.load(recorded).data
    if not cfg.trust_checkpoint:
        check_data_targets(recorded, data)
    with open_dict(data):
        data.data_dir, data.mirror = cfg.paths.data_dir, cfg.paths.data_mirror
    return data


def check_data_targets(recorded: Path, data: DictConfig) -> None:
    """Building the data calls what the record's ``_target_`` names: a shared run folder may name
    anything, so only genlab's own data modules are built from it (and nothing nested)."""
    targets = targets_in(OmegaConf.to_container(data))
    known = genlab_classes("genlab.data", L.LightningDataModule)
    if targets != [data.get("_target_")] or targets[0] not in known:
        raise CheckpointError(
            f"{recorded} names data targets {targets}, and eval.py builds only genlab's own data modules "
            f"({', '.join(sorted(known))}) from a run's record, since building one calls what it names. If you "
            "trust this run folder, evaluate it with trust_checkpoint=true")


def targets_in(node) -> list:
    """Every ``_target_`` of a config, however deep (lists too: Hydra builds those as well)."""
    if isinstance(node, dict):
        return [*([node["_target_"]] if "_target_" in node else []), *(t for v in node.values() for t in targets_in(v))]
    if isinstance(node, list):
        return [t for v in node for t in targets_in(v)]
    return []


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
    datamodule = instantiate(run_data_config(run_dir, cfg))
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    result = {"checkpoint": str(path), "step": checkpoint.get("global_step"), "val_loss": val["loss/val"],
              "val_bpc": val["loss/val_bpc"], "test_loss": None, "test_bpc": None}
    if getattr(datamodule, "has_test", True):
        test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        result.update(test_loss=test["loss/test"], test_bpc=test["loss/test_bpc"])
    shown = f"val {result['val_loss']:.4f}" + (f", test {result['test_loss']:.4f}" if result["test_loss"] else "")
    shown += f" nats per token; val {result['val_bpc']:.4f} bits per character"
    out = Path(cfg.out) if cfg.out else run_dir / "eval.json"
    write_metrics(out, result)
    print(f"{shown} at step {result['step']} of {path}; {out}")
    return result


@checked_command_line("eval")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
