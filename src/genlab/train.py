"""``python train.py [overrides]``: build the data, the model and the trainer from the Hydra config,
train, test, sample, and write ``metrics.json``. Returns the final validation loss (for sweeps)."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from genlab.callbacks import CheckpointAtEnd, ValidateAtEnd
from genlab.checkpoints import read_checkpoint
from genlab.errors import CheckpointError, ConfigError, TrainingDiverged, exit_on_user_error, instantiate
from genlab.figures import plt, save_figure
from genlab.outputs import atomic_write_text, write_metrics
from genlab.runs import checkpoint_file, flatten

log = logging.getLogger("genlab")
# Lightning warns that a checkpoint taken every N steps under manual optimization holds the weights
# after that step's update: that is the state a resume continues from, as intended
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
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
    if in_sweep() and str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
        if "submitit" not in launcher:  # there SLURM starts every process of a job itself
            raise ConfigError(
                f"trainer={choice('trainer')} cannot run inside a Hydra multirun (-m) on this launcher: Lightning's "
                "DDP launcher re-runs the command for each process, which a sweep cannot do (dropped in "
                "Lightning 1.8). Sweep with hydra/launcher=slurm, or run each configuration as its own command")
    if "optimizer" in cfg.model:  # the model builds its own optimizers: optimizer=... would be ignored
        ignored = [o for o in task_overrides() if o.lstrip("+~").startswith(("optimizer", "scheduler"))]
        if ignored:
            raise ConfigError(f"model={choice('model')} sets its optimizers in model.optimizer, so {' '.join(ignored)} "
                              "would have no effect; use model.optimizer.lr=... (and model.optimizer.betas=...)")


def task_overrides() -> list[str]:
    """The command line's overrides (empty when not running under Hydra)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def build_model(cfg: DictConfig, datamodule) -> L.LightningModule:
    model_kind = hydra.utils.get_class(cfg.model._target_).kind
    if model_kind == "text":  # data-dependent sizes come from the data, never typed twice
        sizes = {
            "tokenizer": datamodule.tokenizer.to_config(),
            "seq_len": datamodule.seq_len,
            "contiguous": getattr(datamodule, "contiguous", False),
        }
    else:
        sizes = {"image_size": datamodule.image_size}
    if "optimizer" not in cfg.model:  # a model with optimizers of its own (the GAN's two) keeps them
        sizes["optimizer"] = OmegaConf.to_container(cfg.optimizer, resolve=True)
        sizes["scheduler"] = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None
    return instantiate(
        cfg.model,
        **sizes,
        _recursive_=False,
        _convert_="all",  # plain dicts and lists in the hyper-parameters (checkpoints load safely)
    )


def build_trainer(cfg: DictConfig, run_dir: Path, updates_per_step: int = 1, single_pass: bool = False,
                  validates: bool = True) -> L.Trainer:
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer={choice('trainer')} needs a CUDA GPU, and this machine shows none "
                          "(torch.cuda.is_available() is False); use trainer=cpu")
    if cfg.val_every % updates_per_step:
        raise ConfigError(
            f"val_every={cfg.val_every} must be a multiple of model.updates_per_step={updates_per_step}"
        )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]  # x=null: off
    if validates:
        callbacks.append(ValidateAtEnd())
    else:  # nothing to validate (the GAN): keep last.ckpt every val_every steps and at the end
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks += [ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.val_every,
                                      save_top_k=0, save_last=True), CheckpointAtEnd()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
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
    overrides = [o for o in task_overrides() if not o.startswith("ckpt_path=")]
    return " ".join(["python train.py", *overrides, f"ckpt_path={run_dir}"])


def train(cfg: DictConfig) -> float | None:
    run_dir = Path(cfg.paths.output_dir)
    check_compatible(cfg)
    set_threads(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    lr_figure = None
    if cfg.get("tune_lr"):
        lr, lr_figure = find_learning_rate(cfg, run_dir, datamodule)
        with open_dict(cfg):
            cfg.optimizer.lr = lr
        if not cfg.lr_finder.then_train:
            write_metrics(run_dir / "metrics.json", {"status": "lr_search_only", "suggested_lr": lr})
            return None
        L.seed_everything(cfg.seed, workers=True)  # training starts as it would with lr= given
    model = build_model(cfg, datamodule)
    ckpt_path = resume_checkpoint(cfg, model, datamodule)
    if hasattr(datamodule, "training_words"):
        model.training_words = sorted(datamodule.training_words())
    updates_per_step = getattr(model, "updates_per_step", 1)
    datamodule.batches_per_step = updates_per_step
    trainer = build_trainer(cfg, run_dir, updates_per_step, getattr(model, "single_pass", False),
                            validates=is_overridden("validation_step", model))

    # under DDP every process trains on its own batch: the batch an update averages over is world_size times
    # larger (the learning rate is the same on every process, so it is the global one already)
    hparams = {**flat_hparams(cfg), "trainer.world_size": trainer.world_size,
               "data.global_batch_size": cfg.data.batch_size * trainer.world_size}
    for logger in trainer.loggers:  # TensorBoard's HPARAMS tab shows these metrics beside the config
        if isinstance(logger, TensorBoardLogger) and model.kind == "text":
            logger.log_hyperparams(hparams, metrics={"hp/val_loss": math.nan, "hp/best_val_loss": math.nan})
        else:
            logger.log_hyperparams(hparams)
        if lr_figure is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("lr_find", np.asarray(Image.open(lr_figure).convert("RGB")), 0, dataformats="HWC")

    start = time.perf_counter()
    try:
        with GracefulStop(trainer) as stop:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged as err:
        if not in_sweep():
            raise
        # one bad trial must not end the sweep: report it with a large finite loss and go on
        log.warning("this trial diverged (%s); reported to the sweep as failed with val_loss=%g", err, cfg.diverged_loss)
        write_metrics(run_dir / "metrics.json", {"status": "diverged", "error": str(err), "val_loss": cfg.diverged_loss,
                                                 "best_val_loss": cfg.diverged_loss, "steps": int(trainer.global_step)})
        return float(cfg.diverged_loss)
    train_seconds = time.perf_counter() - start
    if stop.signal is not None:
        print(f"\nstopped by {signal.Signals(stop.signal).name} at step {trainer.global_step}; saved "
              f"{run_dir / 'checkpoints' / 'last.ckpt'}.\nResume with:\n  {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(128 + stop.signal)

    if model.kind == "image":
        metrics = {**model.summary(), "images_per_second": round(model.images_seen / train_seconds, 1)}
    else:
        metrics = evaluate_language_model(trainer, model, datamodule)
        metrics["tokens_per_second"] = round(model.tokens_seen / train_seconds, 1)
    metrics.update(status="completed", steps=int(trainer.global_step), train_seconds=round(train_seconds, 3),
                   threads=torch.get_num_threads(), world_size=trainer.world_size)
    if trainer.is_global_zero:
        if model.kind == "text":
            write_name_samples(cfg, run_dir, trainer, model, datamodule.tokenizer)
        for logger in trainer.loggers:
            if "val_loss" in metrics:
                logger.log_metrics({"hp/val_loss": metrics["val_loss"], "hp/best_val_loss": metrics["best_val_loss"]},
                                   trainer.global_step)
            logger.finalize("success")
        write_metrics(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", metrics)
        log.info("run folder: %s", run_dir)
    return metrics.get("val_loss")


def in_sweep() -> bool:
    """True in a job of ``-m`` (a grid sweep or an Optuna study)."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def set_threads(cfg: DictConfig) -> None:
    """``threads=N``, or under the parallel launcher an equal share of the cores for each job
    (n_jobs processes each using every core would only fight over them)."""
    threads = cfg.get("threads")
    if threads is None and in_sweep():
        launcher = HydraConfig.get().launcher
        if "joblib" in str(launcher.get("_target_", "")).lower():
            n_jobs = launcher.get("n_jobs") or 1
            cores = os.cpu_count() or 1
            threads = max(1, cores // (cores if n_jobs < 0 else n_jobs))
    if threads:
        torch.set_num_threads(int(threads))


def find_learning_rate(cfg: DictConfig, run_dir: Path, datamodule) -> tuple[float, Path]:
    """Lightning's LR finder on a fresh copy of the model (the notebook's search over 10^-3 .. 10^0):
    the rate grows exponentially, one update per step, until the loss blows up. Writes
    ``lr_find.png`` (loss against log10 of the rate) and returns the suggested rate."""
    from lightning.pytorch.tuner import Tuner

    model = build_model(cfg, datamodule)
    if model.kind != "text" or not model.hparams.get("optimizer"):
        raise ConfigError(f"tune_lr=true searches the learning rate of a language model's optimizer; "
                          f"model={choice('model')} has none to search")
    model.updates_per_step = datamodule.batches_per_step = 1  # the finder moves the rate once per step
    search = cfg.lr_finder
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          default_root_dir=str(run_dir))
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=search.min_lr, max_lr=search.max_lr,
                                    num_training=search.num_training, update_attr=False)
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise ConfigError(f"the LR finder found no rate where the loss falls fast; widen lr_finder.min_lr/max_lr "
                          f"or raise lr_finder.num_training (now {search.num_training})")
    exponents = [math.log10(lr) for lr in finder.results["lr"]]
    path = run_dir / "lr_find.png"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(exponents, finder.results["loss"], lw=1)
    ax.axvline(math.log10(suggestion), color="red", ls="--", label=f"suggested lr = {suggestion:.3g}")
    ax.set(xlabel="log10(learning rate)", ylabel="training loss (smoothed)", title="Learning-rate search")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    print(f"LR finder: suggested learning rate {suggestion:.4g} (plot: {path})")
    return float(suggestion), path


def evaluate_language_model(trainer: L.Trainer, model, datamodule) -> dict:
    """Final and best validation loss, and the test loss where the data has a test split."""
    val = float(trainer.callback_metrics["val/loss"])  # ValidateAtEnd: measured after the last update
    test = None  # text data has a test split only when data.test_fraction > 0
    if getattr(datamodule, "has_test", True):
        test = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/loss"])
    checkpoint_cb = trainer.checkpoint_callback
    best = float(checkpoint_cb.best_model_score) if checkpoint_cb and checkpoint_cb.best_model_score is not None else val
    return {"val_loss": val, "best_val_loss": min(best, val), "test_loss": test}


def write_name_samples(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, model, tokenizer) -> None:
    """Names data: ``num_samples`` sampled names to samples.txt, the console and TensorBoard."""
    if tokenizer.eos_id is None or cfg.num_samples <= 0:
        return
    samples = sample_names(model, tokenizer, cfg.num_samples, cfg.seed)
    atomic_write_text(run_dir / "samples.txt", "\n".join(samples) + "\n")
    print("\n".join(samples))
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("samples", "  \n".join(samples), trainer.global_step)


def flat_hparams(cfg: DictConfig) -> dict:
    """The config as flat key/values for TensorBoard's HPARAMS tab (lists become strings)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    groups = {group: container.get(group) or {} for group in ("data", "model", "optimizer", "scheduler", "trainer")}
    out = {}
    for name, value in flatten(groups).items():
        out[name] = "null" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)
    out["seed"] = container["seed"]
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return train(cfg)
