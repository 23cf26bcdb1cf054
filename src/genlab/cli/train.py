"""``python train.py [overrides]``: the path of one run, top to bottom.

1. resolve the run's plan (``genlab.run.plan``: the config checked by ``genlab.run.checks``, its validation
   interval and precision, the data's fingerprint) and take the run folder on it, which refuses a
   folder that holds another run or that another process is writing (``genlab.run.runs``);
2. build the model, check a resumed checkpoint against it, resolve the rest of the plan (the learning
   rate of ``tune_lr``, the updates per step), then claim the folder (record the plan once, start
   ``train.log``); nothing is written into it before this point, nothing changes the plan after;
3. fit; Ctrl-C or SIGTERM finish the step, save and exit with the resume command (``genlab.run.stopping``);
4. the wrap-up: final validation and test losses, ``metrics.json`` (samples come after every validation).

Returns the final validation loss (an image model's: its FID), which a sweep minimises (a sweep
job's failure is recorded in its folder once the job owns it, else beside it, and the sweep goes on:
``genlab.sweeps``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from genlab.callbacks import CheckpointAtEnd, Samples, TrainingClock, ValidateAtEnd
from genlab.run.checkpoints import check_resume, read_checkpoint, trainer_plugins
from genlab.data.module import ready
from genlab.console import UpdateProgress, printable, result_summary, route_library_logs, run_summary
from genlab.cli.evaluate import final_losses
from genlab.errors import DiskFull, TrainingDiverged, exit_on_user_error, instantiate
from genlab.results.hparams import log_hparams, run_hparams
from genlab.loop.lr_finder import find_learning_rate, plot_search
from genlab.run.outputs import write_metrics
from genlab.cli.overrides import checked_command_line
from genlab.run.plan import Plan, optimizer_key
from genlab.run.plan import resolve as resolve_plan
from genlab.loop.precision import hardware
from genlab.results.quality import image_quality
from genlab.run.ranks import Ranks
from genlab.run.resume import how_to_continue, last_good_state, report_stop
from genlab.run.runs import RunFolder
from genlab.run.runtime import CONF_DIR, choice, in_sweep, set_threads, skip_failing_nvml_check
from genlab.loop.steps import LoopSettings, fit, resolve_updates_per_step, validation_check_interval, validation_interval
from genlab.run.stopping import GracefulStop, RunInterrupted
from genlab.sweeps import run_sweep_job

log = logging.getLogger("genlab")


def train(cfg: DictConfig) -> float | None:
    route_library_logs()
    run_dir = Path(cfg.paths.output_dir)
    ranks = Ranks(cfg.trainer)  # a failure of any process ends them all, with its message
    stop = GracefulStop(cfg.get("max_requeues", 3))
    with ranks, stop, RunFolder(run_dir, primary=ranks.first, ranks=ranks) as folder:
        # the plan first: a configuration or data that cannot work fails before the folder is touched
        plan = resolve_plan(cfg)
        set_threads(plan.cfg)
        skip_failing_nvml_check()
        L.seed_everything(plan.cfg.seed, workers=True)
        datamodule = ready(instantiate(plan.cfg.data))  # its files on disk and loaded (genlab.data.module)
        plan = plan.with_values(data=datamodule.fingerprint)
        start = folder.open(plan)  # the first process decides; the others learn its decision here
        if start.done is not None:
            return kept_result(start.done, run_dir)
        try:
            return run(plan, datamodule, run_dir, folder, stop, Path(start.ckpt_path) if start.ckpt_path else None)
        except RunInterrupted:
            report_stop(stop, run_dir)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err} {last_good_state(run_dir)}", step=err.step) from None
        except DiskFull as err:
            raise DiskFull(f"{err} Free some space (or move the run's folder), then "
                           f"{how_to_continue(run_dir)}") from None


def run(plan: Plan, datamodule, run_dir: Path, folder: RunFolder, stop: GracefulStop,
        ckpt_path: Path | None) -> float | None:
    """The rest of the plan resolved (the learning rate a search chose, K), the folder claimed with it,
    then training. From the claim on, nothing changes the plan's config or the built model and data."""
    cfg = plan.cfg
    trust = bool(cfg.get("trust_checkpoint"))
    # first of all: a checkpoint that is refused is refused before anything is built or written
    checkpoint = read_checkpoint(ckpt_path, trust) if ckpt_path is not None else None
    found = (checkpoint or {}).get("hyper_parameters", {}).get("optimizer", {}).get("lr")
    if found is not None and cfg.get("tune_lr"):  # a resume trains on with the rate its search found
        plan = plan.with_values(lr=found)
    if checkpoint is not None and not folder.rerun:  # an explicit ckpt_path=: the record says so
        plan = plan.with_values(continues={"step": checkpoint["global_step"], "checkpoint": str(ckpt_path),
                                           "from": checkpoint.get("genlab_plan"),
                                           "differs": plan.differences(folder.recorded)})
    model = build_model(plan.cfg, datamodule)
    if checkpoint is not None and folder.primary:
        check_resume(checkpoint, model, cfg.trainer.max_steps)
    quality = image_quality(cfg, datamodule) if model.kind == "image" else None
    search = None
    if cfg.get("tune_lr") and checkpoint is None:
        lr, search = find_learning_rate(cfg, datamodule, model)  # on this first model; training gets a fresh one
        plan = plan.with_values(lr=lr)
        L.seed_everything(cfg.seed, workers=True)  # training starts as it would with lr= given
        model = build_model(plan.cfg, datamodule)
    cfg = plan.cfg
    if (words := datamodule.training_words()) is not None:
        model.training_words = sorted(words)
    updates_per_step = resolve_updates_per_step(model, datamodule, cfg.val_every, checkpoint, cfg.trainer)
    if quality is not None:  # validations generate from the measure's fixed noise and score the images
        model.quality = quality
        datamodule.validation_noise = quality.noise_batches(model.latent_shape)
    plan = plan.with_values(updates_per_step=updates_per_step)
    folder.claim(plan)

    lr_figure = None
    if search is not None:
        lr = OmegaConf.select(cfg, f"{optimizer_key(cfg)}.lr")
        lr_figure = plot_search(search, lr, run_dir)
        if not cfg.lr_finder.then_train:
            write_metrics(run_dir / "metrics.json", {"status": "lr_search_only", "suggested_lr": lr})
            return None
    trainer = build_trainer(cfg, run_dir, updates_per_step, model.single_pass,
                            validates=model.monitor is not None, stop=stop, monitor=model.monitor,
                            ranks=folder.ranks)
    trainer.callbacks.append(PlanInCheckpoints(plan))
    log_hparams(trainer.loggers, run_hparams(cfg, trainer.world_size), lr_figure)
    validation = validation_words(datamodule, validation_interval(cfg, updates_per_step)) if model.monitor else None
    log.info(run_summary({group: choice(group) for group in ("model", "data", "trainer")}, model, trainer, run_dir,
                         plan.precision_words, validation))

    start = time.perf_counter()
    fit(trainer, model, datamodule, updates_per_step, ckpt_path=ckpt_path, weights_only=not trust)
    train_seconds = time.perf_counter() - start
    if stop.stop_requested:
        report_stop(stop, run_dir)
    return wrap_up(run_dir, trainer, model, datamodule, train_seconds, label={"name": cfg.get("name"), "tags": list(cfg.get("tags") or [])})


class PlanInCheckpoints(L.Callback):
    """Every checkpoint names the plan it was trained under (``.hydra/plan.json``'s identity)."""

    def __init__(self, plan: Plan):
        self.identity = plan.record()["identity"]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["genlab_plan"] = self.identity


def kept_result(metrics: dict, run_dir: Path) -> float | None:
    """A sweep job (or requeued SLURM job) that ran to its end before: its figures, untouched."""
    loss = metrics.get("reported_loss", metrics.get("val_loss"))
    log.info("this job %s before: %s holds its result (val_loss %s); kept as it is",
             metrics.get("status"), run_dir, metrics.get("val_loss"))
    return loss


def build_model(cfg: DictConfig, datamodule) -> L.LightningModule:
    sizes = datamodule.model_sizes()  # data-dependent sizes come from the data, never typed twice
    if "optimizer" not in cfg.model:  # a model with optimizers of its own (the GAN's two) keeps them
        sizes["optimizer"] = OmegaConf.to_container(cfg.optimizer, resolve=True)
        sizes["scheduler"] = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None
    model = instantiate(
        cfg.model,
        **sizes,
        _recursive_=False,
        _convert_="all",  # plain dicts and lists in the hyper-parameters (checkpoints load safely)
    )
    model.loop = LoopSettings(**cfg.loop)  # how the loop trains it, whichever model it is
    return model


def build_trainer(cfg: DictConfig, run_dir: Path, updates_per_step: int = 1, single_pass: bool = False,
                  validates: bool = True, stop: GracefulStop | None = None, monitor: str = "loss/val",
                  ranks: Ranks | None = None) -> L.Trainer:
    val_every = validation_interval(cfg, updates_per_step)
    # x=null: off; a callback that watches a figure (best.ckpt's) watches the model's: loss/val, quality/fid
    callbacks = [instantiate(c, **({"monitor": monitor} if "monitor" in c else {}))
                 for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if validates:
        callbacks.append(ValidateAtEnd())
    else:  # nothing to validate (the GAN): keep last.ckpt every val_every steps
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=val_every,
                                         save_top_k=0, save_last=True, enable_version_counter=False))
    callbacks.append(CheckpointAtEnd())  # last.ckpt also when a signal stops training early
    callbacks.append(TrainingClock())  # after CheckpointAtEnd: its last.ckpt counts as validation time
    callbacks.extend(c for c in (stop, ranks) if c is not None)
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(UpdateProgress())
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        val_check_interval=validation_check_interval(cfg, updates_per_step),
        plugins=trainer_plugins(cfg.trainer, run_dir / "checkpoints"),
        check_val_every_n_epoch=None,
        **({"max_epochs": 1, "max_steps": -1} if single_pass else {}),
        **({} if validates else {"limit_val_batches": 0}),
    )


def wrap_up(run_dir: Path, trainer: L.Trainer, model, datamodule, train_seconds: float, label: dict) -> float | None:
    """After training: the final figures, samples and ``metrics.json`` (the mark of a finished run)."""
    if model.kind == "image":
        if model.quality is not None and "quality/fid" not in trainer.callback_metrics:
            trainer.validate(model, verbose=False)  # a resumed run whose training had ended
        metrics = {**model.summary(), **model.quality_summary(),
                   "images_per_second": round(model.images_seen / train_seconds, 1)}
    else:
        metrics = final_losses(trainer, model, datamodule, validated=True)
        metrics["best_val_loss"] = min(model.best_val_loss, metrics["val_loss"])
        metrics["tokens_per_second"] = round(model.tokens_seen / train_seconds, 1)
    clock = next((c for c in trainer.callbacks if isinstance(c, TrainingClock)), None)
    if clock is not None and clock.seconds is not None:
        metrics["update_seconds"] = round(clock.seconds, 3)
    metrics.update(status="completed", steps=int(trainer.global_step), train_seconds=round(train_seconds, 3),
                   threads=torch.get_num_threads(), world_size=trainer.world_size, hardware=hardware(trainer), **label)
    if trainer.is_global_zero:
        print_samples(trainer)
        for logger in trainer.loggers:
            logger.finalize("success")
        write_metrics(run_dir / "metrics.json", metrics)
        log.info(result_summary(metrics, run_dir, UpdateProgress.unit(model)))
    return metrics.get("fid" if model.kind == "image" else "val_loss")  # what a sweep minimises


def validation_words(datamodule, every: int) -> str | None:
    """What each validation covers and how often, for the summary line (data with a scope: text)."""
    scope = datamodule.evaluation_scope("val")
    if scope is None:
        return None
    covers = scope["description"].split(": ", 1)[1]
    return f"validation: {covers} every {every:,} update{'' if every == 1 else 's'}"


def print_samples(trainer: L.Trainer) -> None:
    """The run's last samples (genlab.callbacks.Samples wrote them to samples.txt and TensorBoard)."""
    samples = next((c.latest for c in trainer.callbacks if isinstance(c, Samples)), [])
    if samples:
        print(printable("\n".join(samples)))


@checked_command_line("train")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    if in_sweep():  # a job's failure is recorded in its folder and the sweep goes on
        return run_sweep_job(train, cfg)
    return exit_on_user_error(train)(cfg)
