"""The run plan: everything that decides what a run computes, resolved before anything is written,
recorded once in the run folder (``.hydra/plan.json``) and compared whole when the folder (or a
sweep's job folder) is met again.

A plan holds the resolved configuration with its YAML defaults (``config``: the validation interval
``val_every``, ``trainer.precision`` and the learning rate a ``tune_lr`` search chose are filled in,
and for running text what a validation covers: ``data.val_tokens`` lowered to the run's size and
``data.eval_batch_size``, ``genlab.run.checks.validation_size``),
the data's content fingerprint (the data module's ``fingerprint``: for a word list or a text, a hash
of its content; for images, the files' names, sizes and times) and the updates per step K that
the run trains with. Its ``config`` is read-only: nothing changes it after it is made, and nothing
changes the model and data module built from it once the folder is claimed (the final evaluation of
a whole split gets the scope as an argument).

What is compared (``identity``): the configuration less the settings that say where and how a run is
launched rather than what it computes (``LAUNCH_SETTINGS``), and the data's fingerprint. Not K when
``loop.updates_per_step=auto`` chose it by timing: the curves, checkpoints and validations are the
same whatever K is (DESIGN.md, "Behaviour that does not depend on the machine"), and a resumed run
takes the K its checkpoint trained with, so a re-run on a busier machine is still the same run. Not
the learning rate a search chose either: it follows from the configuration (``tune_lr=true`` and
its search settings are compared), and a resumed run takes the recorded one instead of searching
again."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.run.checks import check_config, validation_size
from genlab.loop.precision import resolve_precision
from genlab.loop.steps import LOOP_KEYS, validation_interval

PLAN_FILE = Path(".hydra") / "plan.json"
# where and how a run is launched, not what it computes: a resume or a re-run may change these
LAUNCH_SETTINGS = ("ckpt_path", "overwrite", "trust_checkpoint", "threads", "paths", "failed_loss", "max_requeues",
                   "trainer.enable_progress_bar", "trainer.enable_model_summary")


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: DictConfig  # read-only
    precision_words: str | None = None  # how the summary line names the precision (GPU runs)
    data: str | None = None  # the data's content fingerprint
    updates_per_step: int | None = None  # K, once resolved
    continues: dict | None = None  # an explicit ckpt_path=: the step it continued from, what differed

    def with_values(self, **values) -> "Plan":
        """A copy with more resolved: ``lr`` (into the optimizer's config), ``data``, ``updates_per_step``,
        ``continues``."""
        cfg = self.cfg
        if "lr" in values:
            cfg = frozen(self.cfg, {f"{optimizer_key(self.cfg)}.lr": values.pop("lr")})
        return dataclasses.replace(self, cfg=cfg, **values)

    @property
    def config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    def identity(self) -> dict:
        """What is compared: dotted keys -> values (see the module's note)."""
        return identity_of(self.config, self.data)

    def record(self) -> dict:
        """What ``.hydra/plan.json`` holds."""
        return {"identity": digest(self.identity()), "config": self.config, "data": self.data,
                "updates_per_step": self.updates_per_step, "continues": self.continues}

    def differences(self, recorded: dict | None) -> list[str]:
        """The settings in which a recorded plan (``plan.json``'s content) differs from this one, as
        ``key: recorded -> now``; empty when they are the same plan."""
        if recorded is None:
            return ["(the folder records no plan: a run of an older genlab, or of another program)"]
        if recorded.get("identity") == digest(self.identity()):
            return []
        config = recorded.get("config")
        if not isinstance(config, dict):
            return ["(the folder's plan.json cannot be read as a plan)"]
        before = identity_of(config, recorded.get("data"))  # plain data: nothing in the record is resolved
        now = self.identity()
        keys = sorted(set(before) | set(now))
        return [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
                for k in keys if before.get(k, "(unset)") != now.get(k, "(unset)")]


def identity_of(config: dict, data) -> dict:
    """A resolved config (plain containers) and its data's fingerprint as the compared settings:
    launch settings left out, and the values chosen for the run (K under auto, the rate tune_lr finds)."""
    settings = {k: v for k, v in flatten(config).items() if not is_launch_setting(k)}
    for key in LOOP_KEYS:  # a plan recorded when these were the model's settings
        if f"model.{key}" in settings:
            settings[f"loop.{key}"] = settings.pop(f"model.{key}")
    if settings.get("loop.updates_per_step") == "auto":
        settings.pop("loop.updates_per_step", None)
    if config.get("tune_lr"):
        model = config.get("model")
        settings.pop("model.optimizer.lr" if isinstance(model, dict) and "optimizer" in model else "optimizer.lr", None)
    return {**settings, "data (content fingerprint)": data}


def resolve(cfg: DictConfig) -> Plan:
    """The plan's first part, from the configuration alone: checked (``genlab.run.checks``), its validation
    interval, precision and validation size filled in. Raises ConfigError before anything is loaded or written."""
    check_config(cfg)
    work = copy.deepcopy(cfg)  # the command's own cfg is never changed
    fixed = work.loop.updates_per_step
    with open_dict(work):
        work.val_every = validation_interval(work, 1 if fixed == "auto" else fixed)
        work.data.update(validation_size(cfg))  # from the interval asked for, so the same whatever K is
    words = resolve_precision(work)
    return Plan(frozen(work), precision_words=words)


def frozen(cfg: DictConfig, values: dict | None = None) -> DictConfig:
    """A read-only copy of ``cfg`` with dotted ``values`` set."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        for key, value in (values or {}).items():
            OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def optimizer_key(cfg: DictConfig) -> str:
    return "model.optimizer" if "optimizer" in cfg.model else "optimizer"


def is_launch_setting(key: str) -> bool:
    return any(key == s or key.startswith(f"{s}.") for s in LAUNCH_SETTINGS)


def flatten(node: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys: {"model": {"n_embd": 10}} -> {"model.n_embd": 10}."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
