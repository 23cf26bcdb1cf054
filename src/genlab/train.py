"""``python train.py [overrides]``: build the data, the model and the trainer from the Hydra config,
train, test, sample, and write ``metrics.json``. Returns the final validation loss (for sweeps)."""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from genlab.callbacks import ValidateAtEnd
from genlab.checkpoints import read_checkpoint
from genlab.errors import CheckpointError, ConfigError, exit_on_user_error, instantiate
from genlab.outputs import atomic_write_text, write_metrics
from genlab.runs import checkpoint_file

log = logging.getLogger("genlab")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def choice(group: str) -> str:
    """The option chosen for a config group (``model=mlp`` -> "mlp"), for messages."""
    try:
        return HydraConfig.get().runtime.choices.get(group) or "?"
    except ValueError:  # not running under Hydra (tests that compose by hand)
        return "?"


def check_compatible(cfg: DictConfig) -> None:
    """A model and data that cannot work together fail at once, before any data is loaded."""
    model_kind = hydra.utils.get_class(cfg.model._target_).kind
    data_kind = hydra.utils.get_class(cfg.data._target_).kind
    if model_kind != data_kind:
        raise ConfigError(
            f"model={choice('model')} works on {model_kind} data, but data={choice('data')} gives "
            f"{data_kind} data; pick a {model_kind} data set or another model."
        )


def build_model(cfg: DictConfig, datamodule) -> L.LightningModule:
    model_kind = hydra.utils.get_class(cfg.model._target_).kind
    sizes = {}
    if model_kind == "text":  # data-dependent sizes come from the data, never typed twice
        sizes = {
            "tokenizer": datamodule.tokenizer.to_config(),
            "seq_len": datamodule.seq_len,
            "contiguous": getattr(datamodule, "contiguous", False),
        }
    return instantiate(
        cfg.model,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        **sizes,
        _recursive_=False,
        _convert_="all",  # plain dicts and lists in the hyper-parameters (checkpoints load safely)
    )


def build_trainer(cfg: DictConfig, run_dir: Path, updates_per_step: int, single_pass: bool = False) -> L.Trainer:
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer={choice('trainer')} needs a CUDA GPU, and this machine shows none "
                          "(torch.cuda.is_available() is False); use trainer=cpu")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [ValidateAtEnd()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if cfg.val_every % updates_per_step:
        raise ConfigError(
            f"val_every={cfg.val_every} must be a multiple of model.updates_per_step={updates_per_step}"
        )
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        val_check_interval=cfg.val_every // updates_per_step,  # Lightning counts its own steps
        check_val_every_n_epoch=None,
        **({"max_epochs": 1, "max_steps": -1} if single_pass else {}),
    )


def sample_names(model, tokenizer, num_samples: int, seed: int, temperature=1.0, top_k=None) -> list[str]:
    """Whole sequences from the start token to the end token (names)."""
    start = torch.full((num_samples, 1), tokenizer.eos_id, dtype=torch.long, device=model.device)
    out = model.generate(
        start,
        max_new_tokens=max(model.seq_len, 1) * 2,
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=torch.Generator(model.device).manual_seed(seed),
    )
    names = []
    for row in out[:, 1:].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        names.append(tokenizer.decode(row))
    return names


def resume_checkpoint(cfg: DictConfig, model, datamodule) -> Path | None:
    """The checkpoint to resume from, checked against the model and data of this config."""
    if not cfg.get("ckpt_path"):
        return None
    path = checkpoint_file(str(cfg.ckpt_path), choice("model"), choice("data"))
    checkpoint = read_checkpoint(path)
    saved_class = checkpoint["genlab"]["class"]
    wanted = f"{type(model).__module__}.{type(model).__qualname__}"
    if saved_class != wanted:
        raise CheckpointError(f"{path} holds a {saved_class.rsplit('.', 1)[-1]} model, but model={choice('model')} "
                              f"is a {wanted.rsplit('.', 1)[-1]}; pass the model= the checkpoint was trained with")
    saved_tokens = checkpoint.get("hyper_parameters", {}).get("tokenizer")
    if saved_tokens is not None and saved_tokens != model.hparams.get("tokenizer"):
        raise CheckpointError(f"{path} was trained on another vocabulary than data={choice('data')} gives; "
                              "resume with the data the run was started with")
    return path


class GracefulStop:
    """Ctrl-C or SIGTERM: finish the current step, validate and save ``last.ckpt``, then stop.
    A second signal stops at once."""

    def __init__(self, trainer: L.Trainer):
        self.trainer, self.signal = trainer, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signal = signum
        self.trainer.should_stop = True  # Lightning validates (and checkpoints) at a stop request
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command(run_dir: Path) -> str:
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:
        overrides = []
    return " ".join(["python train.py", *overrides, f"ckpt_path={run_dir}"])


def train(cfg: DictConfig) -> float:
    run_dir = Path(cfg.paths.output_dir)
    check_compatible(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    ckpt_path = resume_checkpoint(cfg, model, datamodule)
    if hasattr(datamodule, "training_words"):
        model.training_words = sorted(datamodule.training_words())
    updates_per_step = getattr(model, "updates_per_step", 1)
    datamodule.batches_per_step = updates_per_step
    trainer = build_trainer(cfg, run_dir, updates_per_step, getattr(model, "single_pass", False))

    for logger in trainer.loggers:  # TensorBoard's HPARAMS tab shows these metrics beside the config
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat_hparams(cfg), metrics={"hp/val_loss": math.nan, "hp/best_val_loss": math.nan})
        else:
            logger.log_hyperparams(flat_hparams(cfg))

    start = time.perf_counter()
    with GracefulStop(trainer) as stop:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - start
    if stop.signal is not None:
        print(f"\nstopped by {signal.Signals(stop.signal).name} at step {trainer.global_step}; saved "
              f"{run_dir / 'checkpoints' / 'last.ckpt'}.\nResume with:\n  {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(128 + stop.signal)

    val = float(trainer.callback_metrics["val/loss"])  # ValidateAtEnd: measured after the last update
    test = None  # text data has a test split only when data.test_fraction > 0
    if getattr(datamodule, "has_test", True):
        test = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/loss"])
    checkpoint_cb = trainer.checkpoint_callback
    best = float(checkpoint_cb.best_model_score) if checkpoint_cb and checkpoint_cb.best_model_score is not None else val

    metrics = {
        "val_loss": float(val),
        "best_val_loss": min(best, float(val)),
        "test_loss": test,
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(model.tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
    }
    if trainer.is_global_zero:
        tokenizer = datamodule.tokenizer
        if tokenizer.eos_id is not None and cfg.num_samples > 0:
            samples = sample_names(model, tokenizer, cfg.num_samples, cfg.seed)
            atomic_write_text(run_dir / "samples.txt", "\n".join(samples) + "\n")
            print("\n".join(samples))
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_text"):
                    logger.experiment.add_text("samples", "  \n".join(samples), trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics({"hp/val_loss": metrics["val_loss"], "hp/best_val_loss": metrics["best_val_loss"]}, trainer.global_step)
            logger.finalize("success")
        write_metrics(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", metrics)
        log.info("run folder: %s", run_dir)
    return metrics["val_loss"]


def flat_hparams(cfg: DictConfig) -> dict:
    """The config as flat key/values for TensorBoard's HPARAMS tab (lists become strings)."""
    out = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (int, float, str, bool)) or value is None:
                out[name] = "null" if value is None else value
            else:
                out[name] = str(value)

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("data", "model", "optimizer", "scheduler", "trainer"):
        walk(container.get(group) or {}, group + ".")
    out["seed"] = container["seed"]
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return train(cfg)
