"""The one error type didicm raises on purpose.

Every error we raise deliberately derives from ``DidicmError`` so that callers (and the CLI) can tell a
problem with the user's input or files apart from a bug. Subclasses also derive from the matching
built-in type (``ValueError``, ``FileNotFoundError``) so existing ``except`` clauses keep working.
"""


import re

# terminal control sequences (colour, cursor moves) and other C0 controls but tab and newline
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


class DidicmError(Exception):
    """Base class of every error didicm raises on purpose. Messages name the problem and the fix.

    The message never carries terminal escape codes, even when it quotes a library's error or a file's content.
    """

    def __str__(self) -> str:
        return _CONTROL.sub("", super().__str__())


class ConfigError(DidicmError, ValueError):
    """An option has an invalid value (steps <= 0, data ratio outside (0, 1], eps outside (0, 1), ...)."""


class InputError(DidicmError, ValueError):
    """A tensor or image given to didicm has the wrong shape, dtype or values (NaN/Inf)."""


class DataError(DidicmError):
    """A data set is unknown, missing, or holds files that cannot be read."""


class CheckpointError(DidicmError):
    """A checkpoint is missing, truncated, not safetensors, or does not match the model asked for."""
