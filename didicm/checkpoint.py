"""Checkpoints: safetensors for tensors, JSON for everything else, both written atomically.

A checkpoint is a pair ``NAME.safetensors`` + ``NAME.json``. The JSON is written last and records the
SHA-256 of the tensor file, so a pair is *complete* only when both exist and agree: a crash at any moment
leaves either the previous complete checkpoint or the new one, never a half-written file that loads.
Nothing here unpickles: safetensors holds raw tensors, and foreign ``.pth`` files go through
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .errors import CheckpointError
from .files import atomic_write_bytes

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "flatten_optimizer_state", "unflatten_optimizer_state", "safe_torch_load", "is_torch_file",
           "strip_ansi", "FORMAT", "TORCH_SUFFIXES"]

FORMAT = "didicm-checkpoint-v1"
# torch.save files: state dicts and timm CheckpointSaver files (model_best.pth.tar, checkpoint-9.pth.tar)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar")
# The only class an official (timm CheckpointSaver) file needs beyond tensors and containers: its `args`.
SAFE_GLOBALS = (argparse.Namespace,)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_STEP_NAME = re.compile(r"^step_(\d+)\.json$")


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the tensors by name, the JSON metadata, and where it came from."""

    tensors: dict[str, torch.Tensor]
    meta: dict
    path: Path

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix/``, with the prefix removed (e.g. 'model', 'ema')."""
        head = prefix + "/"
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar; returns the .safetensors path."""
    path = Path(path).with_suffix(".safetensors")
    # safetensors refuses views and shared storage; a contiguous CPU copy of each tensor is always accepted.
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    data = safetensors_save(payload)
    atomic_write_bytes(path, data)
    sidecar = dict(meta, format=FORMAT, tensor_file=path.name, sha256=hashlib.sha256(data).hexdigest())
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=2, default=_json_default).encode())
    return path


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def _read_meta(json_path: Path) -> dict:
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint metadata {str(json_path)!r} is unreadable ({error}); the checkpoint "
                              "is incomplete: use an earlier one or retrain") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(json_path)!r} is not a didicm checkpoint description (format {FORMAT})")
    return meta


def _is_complete(json_path: Path) -> bool:
    try:
        meta = _read_meta(json_path)
        data = json_path.with_name(meta["tensor_file"]).read_bytes()
    except (CheckpointError, OSError, KeyError):
        return False
    return hashlib.sha256(data).hexdigest() == meta.get("sha256")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest *complete* ``step_*.safetensors`` under ``directory`` (or its ``checkpoints/``), else None."""
    directory = Path(directory)
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    if not folder.is_dir():
        return None
    candidates = []
    for entry in folder.iterdir():
        match = _STEP_NAME.match(entry.name)
        if match:
            candidates.append((int(match.group(1)), entry))
    for _, json_path in sorted(candidates, reverse=True):
        if _is_complete(json_path):
            return json_path.with_suffix(".safetensors")
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint without running any code from the file.

    ``path`` may be a ``.safetensors`` file or its ``.json``, a run folder (its final ``model`` or newest
    complete step checkpoint), or a foreign ``.pth``/``.pt`` state dict (read with weights_only=True).
    Raises CheckpointError for a missing, truncated, corrupt or non-safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a .safetensors file or a run folder")
    if path.is_dir():
        final = path / "model.safetensors"
        found = final if (final.with_suffix(".json")).is_file() else latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in folder {str(path)!r}")
        path = found
    if is_torch_file(path):
        return _load_foreign(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise CheckpointError(f"{str(path)!r} has no {json_path.name} beside it; a didicm checkpoint is a "
                              ".safetensors file plus its .json description")
    meta = _read_meta(json_path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its description (truncated or "
                              "modified after saving); use an earlier checkpoint")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file ({error})") from None
    return Checkpoint(tensors=tensors, meta=meta, path=path)


def _load_foreign(path: Path) -> Checkpoint:
    """A state dict saved by torch.save elsewhere (or the ``state_dict`` of a timm training checkpoint)."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    return Checkpoint(tensors={f"model/{k}": v for k, v in obj.items()}, meta={"format": "foreign"}, path=path)


def is_torch_file(path: str | Path) -> bool:
    """True for names torch.save files usually carry (.pth, .pt, .bin, .ckpt, .pth.tar)."""
    return str(path).lower().endswith(TORCH_SUFFIXES)


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (torch puts bold markers into its load errors)."""
    return _ANSI.sub("", text)


def safe_torch_load(path: str | Path):
    """``torch.load(weights_only=True)`` that allows ``argparse.Namespace`` and nothing else, and never runs code.

    Tensors, numbers, strings and containers load as usual; any other class or function named in the pickle is
    refused with a CheckpointError that names it, before anything is called (the names are read from the pickle's
    opcodes, which are never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    unsafe = [name for name in _named_globals(path) if name not in allowed]
    if unsafe:
        raise CheckpointError(f"refused to load {str(path)!r}: it names {', '.join(sorted(set(unsafe)))}, which a "
                              "checkpoint does not need (only tensors, plain values and argparse.Namespace are "
                              "allowed); nothing from the file was run")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
        text = strip_ansi(str(error))
        match = re.search(r"GLOBAL ([\w.]+)", text)
        cause = f"it names {match.group(1)}, which is not allowed" if match else \
            f"{type(error).__name__}: {_first_line(text)}"
        raise CheckpointError(f"refused to load {str(path)!r}: it is not a plain checkpoint of tensors ({cause}); "
                              "nothing from the file was run") from None


def _first_line(text: str) -> str:
    # torch's messages open with advice about weights_only=False; the cause is the 'error' line, if any
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = next((line for line in lines if "error" in line.lower() or "unsupported" in line.lower()), None)
    return (cause or (lines[0] if lines else "unreadable"))[:300]


def _named_globals(path: Path) -> list[str]:
    """'module.name' of every global (class or function) the pickle(s) in ``path`` would look up."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a damaged archive: torch.load reports it below
            return []
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from None
    names: list[str] = []
    offset = 0
    # the legacy torch.save format is several pickles in a row followed by raw storage bytes
    while offset < len(data) and data[offset] == 0x80:
        found, offset = _scan_pickle(data, offset)
        names.extend(found)
        if offset is None:
            break
    return names


def _scan_pickle(data: bytes, offset: int) -> tuple[list[str], int | None]:
    """Globals named by the pickle starting at ``offset`` and the offset after it (None if it is unreadable).

    Only walks the opcodes (pickletools.genops); STACK_GLOBAL takes its names from the two strings pushed (or
    fetched from the memo) before it."""
    import io

    names, recent, memo = [], [], {}
    stream = io.BytesIO(data)
    stream.seek(offset)
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                names.append(".".join(str(v) for v in recent[-2:]) if len(recent) >= 2 else "<unknown global>")
            elif opcode.name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif isinstance(arg, str):
                recent.append(arg)
            if opcode.name == "STOP":
                return names, stream.tell()
    except Exception:  # not a pickle after all: torch.load reports it
        return names, None
    return names, None


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer (or any nested) state dict into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}
