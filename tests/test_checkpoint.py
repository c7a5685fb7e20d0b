"""Checkpoints: atomic writes, completeness, refusal of corrupt files and of pickled code."""

import json
import os
import pickle

import pytest
import torch

from didicm.checkpoint import (
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from didicm.errors import CheckpointError, DidicmError
from didicm.files import atomic_write_bytes


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(3, 4, generator=g), "model/b": torch.arange(5)}


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", _tensors(), {"step": 7, "classes": ["x", "y"]})
    ckpt = load_checkpoint(path)
    assert ckpt.meta["step"] == 7 and ckpt.meta["classes"] == ["x", "y"]
    assert torch.equal(ckpt.tensors["model/w"], _tensors()["model/w"])
    assert set(ckpt.section("model")) == {"w", "b"}
    # the run folder and the .json resolve to the same checkpoint
    assert torch.equal(load_checkpoint(path.with_suffix(".json")).tensors["model/b"], torch.arange(5))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"one")
    atomic_write_bytes(tmp_path / "f.bin", b"two")
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", _tensors(), {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_non_safetensors_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", _tensors(), {"step": 1})
    garbage = b"this is not a safetensors file at all"
    path.write_bytes(garbage)
    meta = json.loads(path.with_suffix(".json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(garbage).hexdigest()  # even a matching hash does not make it valid
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)


def test_missing_and_description_less_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "lonely.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no lonely.json"):
        load_checkpoint(tmp_path / "lonely.safetensors")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(folder / f"step_{step:08d}.safetensors", _tensors(step), {"step": step})
    assert latest_checkpoint(tmp_path).name == "step_00000030.safetensors"
    # a crash between the tensor file and its description: the newest pair is incomplete
    (folder / "step_00000030.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000020.safetensors"
    # a tensor file cut short after its description was written
    data = (folder / "step_00000020.safetensors").read_bytes()
    (folder / "step_00000020.safetensors").write_bytes(data[:-10])
    assert latest_checkpoint(tmp_path).name == "step_00000010.safetensors"


class _Payload:
    """Unpickling this would run os.system and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same file through torch.save's zip format is refused too
    torch.save({"weight": _Payload(marker)}, tmp_path / "evil2.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(DidicmError):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_foreign_state_dict_loads(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    ckpt = load_checkpoint(tmp_path / "ok.pth")
    assert torch.equal(ckpt.section("model")["w"], torch.ones(2))


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = flatten_optimizer_state(opt.state_dict())
    path = save_checkpoint(tmp_path / "o.safetensors", {f"optim/{k}": v for k, v in tensors.items()},
                           {"optimizer": rest})
    ckpt = load_checkpoint(path)
    restored = unflatten_optimizer_state(ckpt.section("optim"), ckpt.meta["optimizer"])
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(restored)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][0][key]), torch.as_tensor(value))
