"""Load data pickles (CIFAR's python layout) without letting them run code.

A pickle names the callables it wants invoked while it is read; ``pickle.load`` imports and calls
whatever it names, so a file from a stranger can run ``os.system``. ``safe_load`` reads with an
Unpickler whose ``find_class`` hands out only a few wrapped constructors that rebuild plain numpy
arrays (numeric dtypes) and byte strings. Dicts, lists, tuples, str, bytes, ints and floats need no
callable at all. Anything else is refused with ``DataError`` before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["safe_load", "safe_loads"]


def _numeric_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(...)`` that refuses object dtypes: an object array would hold arbitrary objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in data pickles")
    return dtype


def _reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for a plain ndarray only (a subclass would pick its own __setstate__)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy.ndarray may be rebuilt from a data pickle")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array constructor: raw bytes plus a (checked) dtype, shape and order."""
    dtype = _numeric_dtype(dtype)
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """How Python 3 pickles bytes at protocol <= 2: ``_codecs.encode(str, 'latin1')``; other codecs refused."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in data pickles")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode may only be applied to a str in data pickles")
    return text.encode("latin1")


# (module, name) -> the callable handed to the unpickler. Both numpy 1 ("numpy.core") and numpy 2
# ("numpy._core") spellings appear in files in the wild; Python 2 pickles name "__builtin__".
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only containers, numbers, strings, bytes and numeric numpy arrays.

    Args:
        data: the pickle's bytes.
        source: where they came from, for error messages.
    Returns:
        The unpickled object.
    Raises:
        DataError: the pickle names anything outside the allow-list, or is truncated or malformed.
    """
    try:
        # latin1 is how Python 2 str (CIFAR's files were written by Python 2) maps losslessly to bytes.
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"{source}: not a safe data pickle ({err}); only plain containers and numeric "
                        "numpy arrays are accepted. Re-create the file from a trusted source.") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError,
            UnicodeDecodeError) as err:
        # A malformed stream makes the unpickler fail in many built-in ways; all mean "bad file".
        raise DataError(f"{source}: corrupt or truncated pickle ({type(err).__name__}: {err}); "
                        "re-download or re-extract the data set.") from err


def safe_load(path: str | Path) -> Any:
    """Read and safely unpickle the file at ``path``; see ``safe_loads``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}. Check that the file exists and is readable.") from err
    return safe_loads(data, str(path))
