"""Checks of a training config that cost nothing and run before anything is loaded or written:
values that cannot work (a batch of 0, a NaN learning rate, ``max_steps=abc``) and a model and
data that cannot work together. Each failure is one ``ConfigError`` naming the setting and the fix."""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from genlab.errors import ConfigError
from genlab.run.ranks import launch
from genlab.run.runtime import choice, in_sweep, launcher_target, task_overrides


def is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_whole(name: str, value, allowed: tuple = ()) -> None:
    if value in allowed and is_whole_number(value):
        return
    if not is_whole_number(value) or value < 1:
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        raise ConfigError(f"{name} must be a whole number of at least 1{extra}, got {value!r}")


def check_learning_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number (e.g. 1e-3), got {value!r}")


# torch.compile's modes (reduce-overhead and max-autotune replay CUDA graphs on a GPU)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value) -> str | None:
    """``loop.compile``: false (None), true (torch.compile's default mode) or the name of a mode."""
    if value in (None, False):
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise ConfigError(f"loop.compile={value}: use false, true or one of torch.compile's modes "
                          f"({', '.join(COMPILE_MODES)})")
    return value


def check_values(cfg: DictConfig) -> None:
    if not is_whole_number(cfg.seed):
        raise ConfigError(f"seed must be a whole number (e.g. seed=42), got {cfg.seed!r}")
    check_loop(cfg.loop)
    if cfg.val_every is not None:
        check_positive_whole("val_every", cfg.val_every)
    check_positive_whole("trainer.max_steps", cfg.trainer.max_steps, allowed=(-1,))
    if cfg.trainer.max_steps == -1 and not (is_whole_number(cfg.trainer.get("max_epochs")) and cfg.trainer.max_epochs > 0):
        raise ConfigError("trainer.max_steps=-1 trains without a step limit, so trainer.max_epochs must be set "
                          f"(a whole number of at least 1), got {cfg.trainer.get('max_epochs')!r}")
    for key in ("batch_size", "seq_len", "block_size", "image_size"):
        if cfg.data.get(key) is not None:
            check_positive_whole(f"data.{key}", cfg.data[key])
    if "val_tokens" in cfg.data:  # running text: a null evaluation batch is sized for throughput
        check_evaluation_sizes(cfg.data.eval_batch_size, cfg.data.val_tokens)
    elif cfg.data.get("eval_batch_size") is not None:
        check_positive_whole("data.eval_batch_size", cfg.data.eval_batch_size)
    if not is_whole_number(cfg.get("max_requeues", 0)) or cfg.get("max_requeues", 0) < 0:
        raise ConfigError(f"max_requeues must be a whole number (0: never requeue), got {cfg.max_requeues!r}")
    if not is_whole_number(cfg.num_samples) or cfg.num_samples < 0:
        raise ConfigError(f"num_samples must be a whole number (0: none), got {cfg.num_samples!r}")
    where = "model.optimizer" if "optimizer" in cfg.model else "optimizer"
    lr = OmegaConf.select(cfg, f"{where}.lr")
    if lr is not None:
        check_learning_rate(f"{where}.lr", lr)


def check_loop(loop: DictConfig) -> None:
    """``conf/loop``: K a whole number or auto, a positive finite clipping norm or none, a compile mode."""
    if loop.updates_per_step != "auto":
        check_positive_whole("loop.updates_per_step", loop.updates_per_step)
    clip = loop.grad_clip
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)
                             or clip <= 0):
        raise ConfigError(f"loop.grad_clip must be a positive finite number (e.g. 1.0) or null (no clipping), got {clip!r}")
    compile_mode(loop.compile)


VALIDATIONS_PER_RUN = 20  # val_every=null: about this many validation points on every curve


def asked_interval(cfg: DictConfig) -> int:
    """The updates between two validations the config asks for: ``val_every``, or where it is null a
    twentieth of ``trainer.max_steps`` (before ``validation_interval`` rounds it to whole Lightning steps)."""
    if cfg.val_every is not None:
        return cfg.val_every
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else 20_000
    return max(1, max_steps // VALIDATIONS_PER_RUN)


# --- what a validation of running text covers (data.val_tokens, data.eval_batch_size) -------------
EVAL_BATCH_TOKENS = 32_768  # data.eval_batch_size=null: about this many tokens per evaluation batch
# a validation's tokens per token trained between two validations: a forward pass costs about a third
# of a training update per token, so a validation costs about a third of the training it follows
VALIDATION_SHARE = 1


def check_evaluation_sizes(eval_batch_size, val_tokens) -> None:
    """``data.eval_batch_size`` and ``data.val_tokens``: a whole number of at least 1, or null."""
    for name, value, null in (("data.eval_batch_size", eval_batch_size, f"about {EVAL_BATCH_TOKENS:,} tokens a batch"),
                              ("data.val_tokens", val_tokens, "the whole split")):
        if value is not None and (not is_whole_number(value) or value < 1):
            raise ConfigError(f"{name} must be a whole number of at least 1, or null ({null}), got {value!r}")


def sized_eval_batch(explicit: int | None, batch_size: int, seq_len: int) -> int:
    """Evaluation windows per batch: ``explicit``, or where it is null enough for ``EVAL_BATCH_TOKENS``
    tokens (at least the training batch). Its memory: evaluation keeps no gradients (one layer's
    activations at a time), and the model computes at most ``LanguageModel.eval_logits`` logits at once,
    a few rows at a time where the vocabulary is large (GPT-2's)."""
    return explicit if explicit is not None else max(batch_size, EVAL_BATCH_TOKENS // seq_len)


def validation_size(cfg: DictConfig) -> dict:
    """Running text's evaluation batch and the most tokens a validation evaluates, sized to the run:
    ``VALIDATION_SHARE`` x the tokens trained between two validations (the asked interval x
    ``data.batch_size`` x ``data.seq_len``: not rounded to K updates per step, nor counting processes,
    so the same on every machine), at least one evaluation batch, at most ``data.val_tokens`` (null: the
    whole split). Empty for data that is evaluated whole (names, images)."""
    data = cfg.data
    if "val_tokens" not in data:
        return {}
    batch = sized_eval_batch(data.get("eval_batch_size"), data.batch_size, data.seq_len)
    trained = asked_interval(cfg) * data.batch_size * data.seq_len
    budget = max(batch * data.seq_len, VALIDATION_SHARE * trained)
    return {"eval_batch_size": batch, "val_tokens": None if data.val_tokens is None else min(data.val_tokens, budget)}


def check_compatible(cfg: DictConfig) -> None:
    """A model and data that cannot work together fail at once, before any data is loaded."""
    model_kind = hydra.utils.get_class(cfg.model._target_).kind
    data_kind = hydra.utils.get_class(cfg.data._target_).kind
    if model_kind != data_kind:
        raise ConfigError(
            f"model={choice('model')} works on {model_kind} data, but data={choice('data')} gives "
            f"{data_kind} data; pick a {model_kind} data set or another model."
        )
    check_processes_in_sweep(cfg)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        from lightning.pytorch.accelerators import MPSAccelerator

        mac = " or trainer=mps (this Mac's GPU)" if MPSAccelerator.is_available() else ""
        raise ConfigError(f"trainer={choice('trainer')} needs a CUDA GPU, and this machine shows none "
                          f"(torch.cuda.is_available() is False); use trainer=cpu{mac}")
    if cfg.trainer.get("accelerator") == "mps":
        check_mps(cfg)
    if "optimizer" in cfg.model:  # the model builds its own optimizers: optimizer=... would be ignored
        ignored = [o for o in task_overrides() if o.lstrip("+~").startswith(("optimizer", "scheduler"))]
        if ignored:
            raise ConfigError(f"model={choice('model')} sets its optimizers in model.optimizer, so {' '.join(ignored)} "
                              "would have no effect; use model.optimizer.lr=... (and model.optimizer.betas=...)")


def check_processes_in_sweep(cfg: DictConfig) -> None:
    """Inside ``-m``, Lightning cannot start a job's processes: its launcher re-runs the command line
    for each, and so each would run the whole sweep (dropped in Lightning 1.8). Whatever setting asks
    for them (a DDP trainer, trainer.devices=2 with strategy auto, devices=-1 on several GPUs, FSDP,
    DeepSpeed, several nodes) is refused, unless the launcher is SLURM's, which starts them itself."""
    if not in_sweep() or "submitit" in launcher_target():
        return
    processes = launch(cfg.trainer)
    if processes.world > 1 and not processes.apart:
        t = cfg.trainer
        raise ConfigError(
            f"trainer={choice('trainer')} (trainer.devices={t.get('devices')}, trainer.num_nodes={t.get('num_nodes', 1)}, "
            f"trainer.strategy={t.get('strategy', 'auto')}) trains in {processes.world} processes, which Lightning "
            "would start itself, and that cannot run inside a Hydra multirun (-m) on this launcher: Lightning re-runs "
            "the command for each process, so each would run the whole sweep. Sweep with hydra/launcher=slurm (SLURM "
            "starts each job's processes), set trainer.devices=1, or run each configuration as its own command")


def check_mps(cfg: DictConfig) -> None:
    """trainer=mps: an Apple-silicon GPU must be there, and what does not run on it is refused."""
    from lightning.pytorch.accelerators import MPSAccelerator

    if not MPSAccelerator.is_available():
        raise ConfigError("trainer=mps needs the GPU of an Apple-silicon Mac (Metal), and this machine shows none "
                          "(torch.backends.mps.is_available() is False, or not an arm64 Mac); use trainer=cpu")
    mode = compile_mode(cfg.loop.compile)
    if mode is not None:
        raise ConfigError(f"loop.compile={cfg.loop.compile} does not run on trainer=mps: torch.compile's Metal "
                          "backend is a prototype (and CUDA graphs are CUDA's); set loop.compile=false")
    precision = str(cfg.trainer.get("precision"))
    if "bf16" in precision:
        raise ConfigError(f"trainer.precision={precision} does not run on trainer=mps: bfloat16 on Metal depends on "
                          "the macOS version and fails in some kernels; use trainer.precision=32-true or 16-mixed")
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if "ddp" in str(cfg.trainer.get("strategy", "")) or devices not in (1, "1", "auto") or nodes != 1:
        raise ConfigError("trainer=mps trains on one device: a Mac has one GPU and Lightning runs no DDP on MPS; "
                          "drop trainer.strategy/devices/num_nodes (or use trainer=ddp_cpu)")


def check_config(cfg: DictConfig) -> None:
    check_values(cfg)
    check_compatible(cfg)
