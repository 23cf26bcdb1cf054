"""Errors that name the problem and the fix. ``train.py`` and ``sample.py`` print these as one
message (no traceback) and exit with status 1."""


class GenlabError(Exception):
    """A problem with the user's input: data, configuration or checkpoint."""


class DataError(GenlabError):
    """A data file is missing, corrupt or unusable."""


class ConfigError(GenlabError):
    """A configuration that cannot work."""


class FolderTaken(ConfigError):
    """The run folder holds another run, or another process is writing it: a sweep records this
    beside the folder, never in it."""


class CheckpointError(GenlabError):
    """A checkpoint that cannot be used."""


class DiskFull(GenlabError):
    """The disk filled while a file was written (``genlab.run.outputs``): the file it was to replace
    is whole, and no temporary file is left."""


class TrainingDiverged(GenlabError):
    """The training loss became NaN or infinite at update ``step``."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def instantiate(config, **kwargs):
    """``hydra.utils.instantiate`` that lets our own errors through unwrapped."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, GenlabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def exit_on_user_error(function):
    """Run ``function``; a GenlabError ends the program with its message alone."""
    import functools
    import sys

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except GenlabError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
