"""The command line checked before Hydra runs it: a key that does not exist gets "did you mean"
with the closest keys of its group (Hydra's own advice, ``+key=value``, would only move the
failure to later), and a sweep's storage that cannot be written or reached gets one message,
before anything loads."""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genlab.errors import ConfigError
from genlab.run.runtime import CONF_DIR

_NOT_A_KEY = re.compile(r"Could not override '([^']+)'")
# Hydra flags after which the command line is not a plain list of overrides: left to Hydra
_OTHER_FLAGS = ("-c", "--cfg", "-p", "--package", "-i", "--info", "-cp", "--config-path", "-cn", "--config-name",
                "-cd", "--config-dir", "--shell-completion", "-sc", "--experimental-rerun", "-h", "--help",
                "--hydra-help", "--version", "--resolve")


def _is_group(key: str) -> bool:
    return "/" in key or (Path(CONF_DIR) / key).is_dir()


def _plain(override) -> str | None:
    """The override as compose() takes it: a sweep's first value (a grid), or None (Optuna's ranges)."""
    if not override.is_sweep_override():
        return override.input_line
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:  # interval(...), tag(...): nothing to pick
        return None
    prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(override.type.name, "")
    return f"{prefix}{override.get_key_element().lstrip('+~')}={first}"


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def did_you_mean(config: DictConfig, key: str) -> str:
    """``key=...`` names no setting: the message, with the closest keys of its group."""
    group, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, group) if group else config
    keys = [k for k in node.keys() if k not in ("hydra", "_target_", "_partial_")] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, keys, n=3, cutoff=0.5)
    full = [f"{group}.{k}" if group else k for k in close]
    where = f"the settings of {group}" if group else "the top-level settings"
    if full:
        return f"{key} is not a setting; did you mean {' or '.join(full)}? ({where}: {', '.join(sorted(keys))})"
    return f"{key} is not a setting. {where.capitalize()}: {', '.join(sorted(keys))}"


def check_storage(storage: str) -> None:
    """An Optuna study's storage (``hydra.sweeper.storage``): an SQLite file whose folder exists
    and can be written, or a database that answers."""
    if storage.startswith("sqlite:///"):
        file = Path(storage[len("sqlite:///"):]).expanduser()
        folder = file.parent if str(file.parent) else Path(".")
        if not folder.is_dir():
            raise ConfigError(f"hydra.sweeper.storage={storage}: the folder {folder} does not exist (SQLite makes the "
                              f"file, not its folder); create it (mkdir -p {folder}) or choose another path")
        if not os.access(folder, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
            raise ConfigError(f"hydra.sweeper.storage={storage}: {file if file.exists() else folder} cannot be written; "
                              "choose a path you can write, e.g. sqlite:///outputs/optuna/study.db")
        return
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(storage).connect():
            pass
    except Exception as err:  # a bad URL, a missing driver, a server that does not answer
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(f"hydra.sweeper.storage={storage}: cannot reach it ({err.__class__.__name__}: {reason}); "
                          "start the database or fix the URL, or use a file: sqlite:///outputs/optuna/study.db") from None


def check_command_line(config_name: str, args: list[str]) -> None:
    """Raise ConfigError for an override naming no setting, or an unusable sweep storage."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=")[0] in _OTHER_FLAGS for a in args):
        return
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    keys = [o for o in parsed if o.type.name == "CHANGE" and not _is_group(o.key_or_group)]
    if not keys and not any(o.key_or_group == "hparams_search" for o in parsed):
        return  # only options chosen: nothing to look up (and no composition to pay for)
    overrides = [line for line in map(_plain, parsed) if line is not None]
    unknown = []
    for _ in range(len(overrides) + 1):  # drop each key that names nothing, and compose again
        try:
            config = _compose(config_name, overrides)
            break
        except HydraException as err:
            found = _NOT_A_KEY.search(str(err))
            if not found:
                return  # another problem (an unknown option of a group): Hydra's message lists the options
            unknown.append(found.group(1))
            overrides = [o for o in overrides if o.lstrip("+~").split("=")[0] != found.group(1)]
    else:
        return
    if unknown:
        raise ConfigError("; ".join(did_you_mean(config, key) for key in unknown))
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    sweeping = "-m" in args or "--multirun" in args or str(OmegaConf.select(config, "hydra.mode")).endswith("MULTIRUN")
    if sweeping and isinstance(storage, str):
        check_storage(storage)


def checked_command_line(config_name: str):
    """Decorate a ``hydra.main`` entry point: check the command line first, and stop with one
    message when it cannot work."""

    def wrap(hydra_main):
        @functools.wraps(hydra_main)
        def entry(*args, **kwargs):
            try:
                check_command_line(config_name, sys.argv[1:])
            except ConfigError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(1)
            return hydra_main(*args, **kwargs)

        return entry

    return wrap
