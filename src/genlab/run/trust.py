"""The trust boundary: everything genlab reads that it did not just write (a run's recorded config,
a checkpoint's dictionaries, JSON records such as ``metrics.json``) is parsed here, as data, before
anything uses it. A run folder or checkpoint from anyone is then safe to open: what it holds is
checked against what genlab itself writes, and anything else is refused with one message naming
the key and the file (``refused``). ``trust_checkpoint=true`` is the one way around it (docs/security.md).

- A recorded config (``.hydra/config.yaml``) is read as plain YAML, and its interpolations are
  resolved here: plain references (``${paths.data_dir}``) only, never a resolver (``${oc.create:..}``,
  ``${oc.env:..}``, ``${now:..}``). Only then are its ``_target_``s checked, against genlab's own
  classes, and the object is built from the very values that were checked (``build``).
- A checkpoint (already unpickled safely: tensors, numbers, strings, lists, dicts) is reduced to the
  entries genlab and Lightning write (``checked_checkpoint``): its optimizer and scheduler must be
  torch's or genlab's, its vocabulary a known kind, and the file paths in its callbacks' state (which
  Lightning later deletes) are replaced by the run's own ``checkpoints/`` folder."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from pathlib import Path

import yaml

from genlab.errors import CheckpointError

TRUST = "trust_checkpoint=true"


def refused(source, what: str, why: str) -> CheckpointError:
    """The one message for whatever the boundary refuses: the file, the key, why, and the way around."""
    return CheckpointError(f"{source} is refused: {what} {why}. genlab reads a run folder or checkpoint it did "
                           "not write as data and builds only its own classes from it (docs/security.md); "
                           f"if you trust this one, pass {TRUST}")


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None where the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_overrides(path: Path) -> list[str] | None:
    """A run's recorded command-line overrides (``.hydra/overrides.yaml``): a YAML list of strings,
    read as text (never resolved); None where the file is missing or is not such a list."""
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# --- recorded configs ------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    """A recorded config as plain containers: YAML's own types only, nothing resolved or built yet."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err.__class__.__name__}: {err})") from None
    except yaml.YAMLError as err:
        raise refused(path, "its text", f"is not plain YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise refused(path, "its text", "is not a mapping of settings")
    return config


REFERENCE = re.compile(r"\$\{([^{}]*)\}")
PLAIN_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


MAX_RESOLVED = 100_000  # settings one resolution may produce: references that multiply (a list of ${b}, b a list of ${c}, ...) are refused


def resolved(config: dict, key: str, source: Path):
    """``config[key]`` with its interpolations resolved by genlab: ``${a.b}`` is the value at ``a.b``
    (a string with references in it gets their values as text); anything else written ``${...}``
    (a resolver call, a relative or nested reference) is refused."""
    left = [MAX_RESOLVED]

    def resolve(node, where: str, seen: tuple):
        left[0] -= 1
        if left[0] < 0:
            raise refused(source, key, f"resolves to more than {MAX_RESOLVED:,} settings")
        if isinstance(node, dict):
            return {k: resolve(v, f"{where}.{k}", seen) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{where}.{i}", seen) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        references = REFERENCE.findall(node)
        if node.count("${") != len(references) or not all(PLAIN_KEY.fullmatch(r) for r in references):
            raise refused(source, f"{where} {node!r}", "is not a plain reference like ${paths.data_dir}, the only "
                                                       "interpolation genlab resolves in a record (it calls no resolver)")
        values = []
        for reference in references:
            if reference in seen:
                raise refused(source, where, f"refers to itself through ${{{reference}}}")
            values.append(resolve(lookup(config, reference, where, source), reference, (*seen, reference)))
        if REFERENCE.fullmatch(node):
            return values[0]
        if any(isinstance(v, (dict, list)) for v in values):
            raise refused(source, f"{where} {node!r}", "puts a group of settings inside a text")
        pieces = iter(values)
        return REFERENCE.sub(lambda _: str(next(pieces)), node)

    return resolve(lookup(config, key, key, source), key, ())


def lookup(config: dict, dotted: str, where: str, source: Path):
    node = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise refused(source, where, f"refers to {dotted}, which the record does not hold")
    return node


def checked_target(node, known: dict[str, type], where: str, source: Path) -> type:
    """The class a resolved config ``node`` names, if it is one of ``known``: one ``_target_`` at
    the top, no other Hydra key (``_args_``, ``_partial_``, ...), nothing nested to build, and only
    the settings the class takes."""
    target = node.get("_target_") if isinstance(node, dict) else None
    if target not in known:
        raise refused(source, f"{where}._target_ {target!r}", f"is not one of {', '.join(sorted(known))}")
    cls = known[target]
    for key, value in node.items():
        if key != "_target_" and isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            raise refused(source, f"{where}.{key}", "is a Hydra instruction, which genlab does not follow in a record")
        if nested := targets_in(value):
            raise refused(source, f"{where}.{key}", f"names {nested[0]!r} to build: a nested _target_")
    parameters = inspect.signature(cls).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        names = {p.name for p in parameters}
        if unknown := sorted(str(k) for k in node if k != "_target_" and k not in names):
            raise refused(source, f"{where}.{unknown[0]}", f"is not a setting of {target}")
    return cls


def targets_in(node) -> list:
    """Every ``_target_`` of a config, however deep (lists too: Hydra builds those as well)."""
    if isinstance(node, dict):
        return [*([node["_target_"]] if "_target_" in node else []), *(t for v in node.values() for t in targets_in(v))]
    if isinstance(node, list):
        return [t for v in node for t in targets_in(v)]
    return []


def build(node: dict, known: dict[str, type], where: str, source: Path):
    """The object a resolved config ``node`` describes, built from these very values once checked."""
    cls = checked_target(node, known, where, source)
    return cls(**{k: v for k, v in node.items() if k != "_target_"})


# --- checkpoints -----------------------------------------------------------------------------------
# what Lightning writes at the top of a checkpoint, and genlab's own entries (its models'
# on_save_checkpoint); a precision plugin's state is kept under the plugin's class name
LIGHTNING_ENTRIES = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                     "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters",
                     "native_amp_scaling_state"}
GENLAB_ENTRIES = {"genlab", "carried_state", "genlab_plan"}  # genlab_plan: the identity of the run plan it trained under
GENLAB_KEYS = {"class": "str", "rng": "Tensor", "training_words": "list of str", "best_val_loss": "number",
               "updates_per_step": "int", "curve_window": "list", "history": "list", "best_fid": "number"}
# ModelCheckpoint's state: files Lightning removes when it writes the next ones
PATH_KEYS = ("best_model_path", "last_model_path", "kth_best_model_path")
TOKENIZERS = {"char": {"type", "chars", "boundary"}, "gpt2": {"type"}}


def precision_entries() -> set[str]:
    from lightning.pytorch.plugins.precision import Precision

    found, todo = set(), [Precision]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        found.add(cls.__qualname__)
    return found


def is_a(value, kind: str) -> bool:
    import torch

    return {"str": lambda: isinstance(value, str), "Tensor": lambda: isinstance(value, torch.Tensor),
            "int": lambda: isinstance(value, int) and not isinstance(value, bool),
            "number": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
            "list": lambda: isinstance(value, list),
            "list of str": lambda: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]()


def checked_checkpoint(checkpoint: dict, source: Path, folder: Path) -> dict:
    """``checkpoint`` reduced to what genlab and Lightning write, its callbacks' file paths moved
    into ``folder`` (the run's ``checkpoints/``); refused, naming the key, where anything else is there."""
    if unknown := sorted(str(k) for k in checkpoint if k not in LIGHTNING_ENTRIES | GENLAB_ENTRIES
                         and k not in precision_entries()):
        raise refused(source, f"its entry {unknown[0]!r}", "is not one that genlab or Lightning writes")
    own = checkpoint.get("genlab")
    if not isinstance(own, dict) or not isinstance(own.get("class"), str) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{source} is not a genlab checkpoint (no model class and weights in it).")
    if not isinstance(checkpoint.get("genlab_plan", ""), str):
        raise refused(source, "genlab_plan", f"holds a {type(checkpoint['genlab_plan']).__name__}, not a str")
    for key, value in own.items():
        if key not in GENLAB_KEYS:
            raise refused(source, f"genlab.{key}", "is not an entry genlab writes")
        if value is not None and not is_a(value, GENLAB_KEYS[key]):
            raise refused(source, f"genlab.{key}", f"holds a {type(value).__name__}, not a {GENLAB_KEYS[key]}")
    check_hyperparameters(checkpoint.get("hyper_parameters") or {}, source)
    callbacks = checkpoint.get("callbacks") or {}
    if not isinstance(callbacks, dict):
        raise refused(source, "callbacks", "is not a mapping of callback states")
    return {**checkpoint, "callbacks": {name: checked_callback_state(state, f"callbacks[{name.split('{')[0]}]", source, folder)
                                        for name, state in callbacks.items()}}


def optimizer_targets() -> set[str]:
    """What an optimizer or scheduler setting may name: torch's optimizers and schedulers, genlab's schedules."""
    import torch

    from genlab import schedules

    def classes(module, base) -> set[str]:
        return {f"{module.__name__}.{name}" for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, base)}

    lr_scheduler = torch.optim.lr_scheduler
    return (classes(torch.optim, torch.optim.Optimizer)
            | classes(lr_scheduler, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
            | {f"genlab.schedules.{name}" for name, value in vars(schedules).items()
               if inspect.isfunction(value) and value.__module__ == schedules.__name__})


def check_hyperparameters(hparams, source: Path) -> None:
    """A model's hyper-parameters are numbers, text and lists, but for the optimizer and scheduler
    (torch's or genlab's, built when a run trains) and the tokenizer (a kind genlab knows)."""
    if not isinstance(hparams, dict):
        raise refused(source, "hyper_parameters", "is not a mapping of settings")
    for key, value in hparams.items():
        where = f"hyper_parameters.{key}"
        if key in ("optimizer", "scheduler") and isinstance(value, dict):
            target = value.get("_target_")
            if target not in optimizer_targets():
                raise refused(source, f"{where}._target_ {target!r}",
                              f"is not one of torch's or genlab's {key}s")
            if extra := [k for k in value if str(k).startswith("_") and k not in ("_target_", "_partial_")] \
                    or [k for k, v in value.items() if targets_in(v)]:
                raise refused(source, f"{where}.{extra[0]}", "is not a setting genlab writes")
        elif key == "tokenizer" and value is not None:
            kind = value.get("type") if isinstance(value, dict) else None
            if kind not in TOKENIZERS or set(value) - TOKENIZERS[kind] \
                    or not all(isinstance(value.get(k), (str, type(None))) for k in ("chars", "boundary")):
                raise refused(source, where, f"is not a vocabulary genlab writes ({', '.join(TOKENIZERS)})")
        elif nested := targets_in(value):
            raise refused(source, where, f"names {nested[0]!r} to build: a nested _target_")


def check_model_settings(hparams: dict, cls: type, source: Path) -> None:
    """Every hyper-parameter is a setting that ``cls`` takes (following ``**kwargs`` up the classes
    that pass them on; a class that takes any keyword, as Lightning's own does, ends the check)."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
        if not klass.__module__.startswith("genlab."):
            return
    if unknown := sorted(str(k) for k in hparams if k not in names):
        raise refused(source, f"hyper_parameters.{unknown[0]}", f"is not a setting of {cls.__module__}.{cls.__qualname__}")


def checked_callback_state(state, where: str, source: Path, folder: Path):
    """A callback's state with the checkpoint files it names moved into ``folder``: a file of the
    folder it recorded (``dirpath``) becomes the same file name in ``folder``; any other path is refused."""
    if not isinstance(state, dict) or not any(k in state for k in (*PATH_KEYS, "dirpath", "best_k_models")):
        return state
    recorded = str(state.get("dirpath") or "").rstrip("/")
    own = os.path.realpath(folder)

    def moved(path, key: str):
        if path in (None, ""):
            return path
        name = os.path.basename(str(path))
        if not isinstance(path, str) or os.path.dirname(path) != recorded or name in ("", ".", ".."):
            raise refused(source, f"{where}.{key} {path!r}", f"is not a file in the folder it records ({recorded})")
        return os.path.join(own, name)

    state = {**state, "dirpath": own, **{k: moved(state[k], k) for k in PATH_KEYS if k in state}}
    if "best_k_models" in state:
        if not isinstance(state["best_k_models"], dict):
            raise refused(source, f"{where}.best_k_models", "is not a mapping of files to scores")
        state["best_k_models"] = {moved(p, "best_k_models"): v for p, v in state["best_k_models"].items()}
    return state
