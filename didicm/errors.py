"""The one error type didicm raises on purpose.

Every error we raise deliberately derives from ``DidicmError`` so that callers (and the CLI) can tell a
problem with the user's input or files apart from a bug. Subclasses also derive from the matching
built-in type (``ValueError``, ``FileNotFoundError``) so existing ``except`` clauses keep working.
"""


class DidicmError(Exception):
    """Base class of every error didicm raises on purpose. Messages name the problem and the fix."""


class ConfigError(DidicmError, ValueError):
    """An option has an invalid value (steps <= 0, data ratio outside (0, 1], eps outside (0, 1), ...)."""


class InputError(DidicmError, ValueError):
    """A tensor or image given to didicm has the wrong shape, dtype or values (NaN/Inf)."""


class DataError(DidicmError):
    """A data set is unknown, missing, or holds files that cannot be read."""


class CheckpointError(DidicmError):
    """A checkpoint is missing, truncated, not safetensors, or does not match the model asked for."""
