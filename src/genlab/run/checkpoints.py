"""Reading checkpoints safely and with clear errors (not a checkpoint, truncated, needing more
than data to load), writing them atomically where they land, and checking that a resume can
continue one (the same model, vocabulary and sizes, updates left to make).

A checkpoint is data: tensors, numbers, strings, lists and dicts. Every load goes through torch's
safe unpickler (``weights_only=True``), so a file that would call anything while loading (which
can run any code) is refused before it runs; ``trust_checkpoint=true`` loads a file the user
trusts the unsafe way. The model class a checkpoint names is looked up among genlab's models and
the class the user names, never imported from the file."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pkgutil
import re
from pathlib import Path

import hydra
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from genlab.errors import CheckpointError, ConfigError, instantiate
from genlab.run.outputs import atomic_torch_save
from genlab.run.runs import checkpoint_file, run_dir_of
from genlab.run.runtime import choice
from genlab.loop.steps import LOOP_KEYS
from genlab.run.trust import TRUST, check_model_settings, checked_checkpoint, read_json



def unpickle(path: Path, trust: bool = False) -> object:
    """``torch.load`` of ``path``, with the safe unpickler unless ``trust``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if rejected := rejected_globals(path, err):
            raise CheckpointError(
                f"{path} is refused: it holds {', '.join(rejected)}, which torch's safe unpickler does not load "
                "(loading it would run code that the file chooses). genlab's checkpoints hold only tensors, "
                "numbers, strings, lists and dicts; nothing in this file was run. If you trust it (you made it, "
                f"e.g. with an earlier genlab), load it with {TRUST}") from None
        raise unreadable(path, err) from None
    except Exception as err:  # a cut-short zip, random bytes, an empty file, ...
        raise unreadable(path, err) from None


def rejected_globals(path: Path, err: Exception) -> list[str]:
    """What the safe unpickler refused to load: every global the file names that is not allowed
    (a scan of the pickle, which runs nothing), else the one torch's error names (older formats)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the pre-zip format cannot be scanned
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]


def unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({err.__class__.__name__}: {str(err)[:120]}); it may be "
        "truncated by an interrupted copy or not a checkpoint at all. Use another one, e.g. "
        "checkpoints/best.ckpt of the same run.")


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """A checkpoint as genlab uses it: through the trust boundary (``genlab.run.trust``) unless ``trust``."""
    path = checkpoint_file(str(path))  # a file or a run folder
    checkpoint = unpickle(path, trust=trust)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("genlab"), dict) \
            or not isinstance(checkpoint["genlab"].get("class"), str) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a genlab checkpoint (no model class and weights in it).")
    if not trust:
        checkpoint = checked_checkpoint(checkpoint, path, run_dir_of(path) / "checkpoints")
    checkpoint["path"] = str(path)
    checkpoint["renamed"] = upgrade_hyperparameters(checkpoint)
    return checkpoint


# hyper-parameters that changed name, old -> new: checkpoints written before still load and resume
RENAMED = {"contiguous": "sequential"}
RENAMED_IN = {"genlab.models.bigram.Bigram": {"context": "block_size"}}


def upgrade_hyperparameters(checkpoint: dict) -> bool:
    """Rename (or drop, for the loop's settings) the hyper-parameters of an older checkpoint in place;
    True if one was changed."""
    hparams = checkpoint.get("hyper_parameters") or {}
    renames = {**RENAMED, **RENAMED_IN.get(checkpoint["genlab"]["class"], {})}
    old = [key for key in renames if key in hparams]
    for key in old:
        hparams[renames[key]] = hparams.pop(key)
    moved = [key for key in LOOP_KEYS if key in hparams]  # the loop's now (conf/loop), not the network's
    for key in moved:
        del hparams[key]
    return bool(old or moved)


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def genlab_classes(package: str, base: type) -> dict[str, type]:
    """The subclasses of ``base`` that genlab's ``package`` defines, by their dotted names."""
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")
    found, todo = {}, [base]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{package}."):
            found[class_name(cls)] = cls
    return found


def genlab_models() -> dict[str, type]:
    """genlab's own model classes by the name a checkpoint stores (``genlab.models.gpt.GPT``)."""
    from genlab.models.module import GenlabModule

    return genlab_classes("genlab.models", GenlabModule)


def model_class(checkpoint: dict, named: str | None = None) -> type:
    """The class of the checkpoint's model: one of genlab's, or ``named``, the class the user's
    own config names (``model_class=``), if the checkpoint names that one."""
    from genlab.models.module import GenlabModule

    saved = checkpoint["genlab"]["class"]
    if cls := genlab_models().get(saved):
        return cls
    if named and saved == named:  # the user's own choice, not the file's
        try:
            cls = hydra.utils.get_class(named)
        except Exception as err:  # noqa: BLE001 (no such module or class: say which)
            raise ConfigError(f"model_class={named} cannot be imported ({str(err).splitlines()[0]})") from None
        if not (isinstance(cls, type) and issubclass(cls, GenlabModule)):
            raise ConfigError(f"model_class={named} is not a genlab model (a subclass of {class_name(GenlabModule)})")
        return cls
    raise CheckpointError(
        f"{checkpoint['path']} names its model class {saved!r}, which is not one of genlab's models"
        + (f" nor model_class={named}" if named else "") + "; genlab imports no class that a checkpoint "
        "names. If it is a model class of your own that you trust, name it yourself: model_class=<module.Class>")


def load_model(path: str | Path, map_location="cpu", trust: bool = False, named: str | None = None):
    """The model of a checkpoint, from the checkpoint alone (its class, sizes and vocabulary)."""
    checkpoint = read_checkpoint(path, trust)
    cls = model_class(checkpoint, named)
    source = checkpoint["path"]
    if not trust:
        check_model_settings(checkpoint.get("hyper_parameters") or {}, cls, Path(source))
    if checkpoint["renamed"] or not trust:  # Lightning builds the model from what was checked (and renamed)
        source = io.BytesIO()
        torch.save({k: v for k, v in checkpoint.items() if k not in ("path", "renamed")}, source)
        source.seek(0)
    model = cls.load_from_checkpoint(source, map_location=map_location, weights_only=not trust)
    return model, checkpoint


# model settings a resumed run may change: how it trains, not what the network is
TRAINING_SETTINGS = ("optimizer", "scheduler")


def check_resume(checkpoint: dict, model, max_steps: int) -> None:
    """Refuse a checkpoint this command cannot continue: another model, vocabulary or size, or a
    run that has already trained every update asked for. Names what differs and what to do."""
    path = checkpoint["path"]
    saved_class = checkpoint["genlab"]["class"]  # compared as a name: nothing is imported from the file
    wanted = class_name(type(model))
    if saved_class != wanted:
        raise CheckpointError(f"{path} holds a {saved_class.rsplit('.', 1)[-1]} model, but model={choice('model')} "
                              f"is a {wanted.rsplit('.', 1)[-1]}; pass the model= the checkpoint was trained with")
    saved = checkpoint.get("hyper_parameters", {})
    if saved.get("tokenizer") is not None and saved["tokenizer"] != model.hparams.get("tokenizer"):
        raise CheckpointError(f"{path} was trained on another vocabulary than data={choice('data')} gives; "
                              "resume with the data the run was started with")
    changed = [f"model.{key}={saved[key]!r} in the checkpoint but {model.hparams[key]!r} now"
               for key in sorted(set(saved) & set(model.hparams))
               if key not in (*TRAINING_SETTINGS, "tokenizer") and saved[key] != model.hparams[key]]
    if changed:
        raise CheckpointError(f"{path} was trained with other sizes than this command gives: {'; '.join(changed)}. "
                              "Resume with the settings the run was started with (its .hydra/overrides.yaml "
                              "lists them), or start a new run")
    step, folder = checkpoint["global_step"], run_dir_of(Path(path))
    completed = finished_at(folder) == step
    if model.single_pass and completed:
        raise CheckpointError(f"the run in {folder} is complete: a counting model makes one pass over the data, "
                              "so there is nothing to continue; start a new run instead")
    if max_steps > 0 and (step > max_steps or (step == max_steps and completed)):
        raise CheckpointError(
            f"the run in {folder} has finished: it trained {step:,} updates, and trainer.max_steps={max_steps} asks "
            f"for no more. To train it further raise trainer.max_steps, e.g. trainer.max_steps={2 * step}")


def finished_at(folder: Path) -> int | None:
    """The update count at which the run in ``folder`` completed (its metrics.json), else None."""
    metrics = read_json(folder / "metrics.json") or {}
    return metrics.get("steps") if metrics.get("status") == "completed" else None


# --- writing ---------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writes, reads and removals for every genlab run, in ``folder`` (the
    run's ``checkpoints/``). Written to a temporary file beside their destination and renamed over
    it, so a full disk (``DiskFull``), a kill or a crash mid-write leaves the previous checkpoint
    whole (a temporary file in the system's temp folder would be copied over it, across
    filesystems). Read with the safe unpickler unless told otherwise (the LR finder's restore, for
    one, does not say), and then through the trust boundary, so that the state Lightning restores
    names only files in ``folder``. Removed only inside ``folder``, one file at a time: Lightning
    removes whatever path its ModelCheckpoint holds, recursively."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("genlab's checkpoints take no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        trusted = weights_only is False  # trust_checkpoint=true: the user's word, the boundary skipped
        checkpoint = super().load_checkpoint(path, map_location, weights_only=not trusted)
        return checkpoint if trusted else checked_checkpoint(checkpoint, Path(path), self.folder)

    def remove_checkpoint(self, path) -> None:
        real, folder = Path(os.path.realpath(path)), Path(os.path.realpath(self.folder))
        if real.parent != folder or not real.is_file():
            raise CheckpointError(
                f"genlab removes checkpoint files only inside {self.folder}, one file at a time, and {path} is not "
                f"one (it is {real}); nothing was removed. If the run resumed from a checkpoint you were given, its "
                "callback state named that path: resume without trust_checkpoint=true, which refuses it")
        real.unlink()


def trainer_plugins(trainer_cfg, folder: str | Path) -> list:
    """``plugins=`` for a Trainer built from ``trainer_cfg``: the config's own (a precision plugin,
    say), which a ``plugins`` argument would replace, and genlab's checkpoint files in ``folder``."""
    own = trainer_cfg.get("plugins") or []
    own = own if OmegaConf.is_list(own) or isinstance(own, list) else [own]
    return [*(instantiate(p) if OmegaConf.is_config(p) else p for p in own), AtomicCheckpointIO(folder)]
