"""The Strong Aug recipe under torchrun (2 processes, gloo, CPU) on a tiny JPEG folder: killed mid-run and
resumed, it ends with the same weights (EMA included) as an uninterrupted run; BatchNorm statistics are made one
across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import make_jpegs

ROOT = Path(__file__).resolve().parents[1]

# the recipe, shrunk: a narrow DiDiRN-18 on 16 px images, 2 epochs of 3 steps (24 images, global batch 8)
TINY = ["data.image_size=16", "data.num_workers=1", "model.name=didirn18",
        "model.kwargs={zero_init_head: false, stem: small, width: 16}", "optim.batch_size_per_gpu=4",
        "optim.epochs=2", "optim.warmup_epochs=1", "eval.steps=2", "eval.batch_size=8", "checkpoint_every=1",
        "keep_checkpoints=10", "device=cpu",
        # EMA: each process's EMA copy keeps BatchNorm statistics of its own batches (made one at checkpoints)
        "optim.ema_decay=0.5"]


def _torchrun(data: Path, output: Path, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "didicm.cli", "train", "--config", str(ROOT / "configs" / "imagenet_didirn50_strong.yaml"),
               "--set", f"data.dataset=folder:{data}", "--set", f"output={output}", "--no-progress"]
    for item in TINY:
        command += ["--set", item]
    if resume:
        command.append("--resume")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts its workers in sessions of their own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(process: subprocess.Popen) -> None:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_strong_recipe_under_torchrun_resumes_to_the_same_weights(tmp_path):
    data = make_jpegs(tmp_path / "jpegs", classes=3, train=8, val=2, size=(24, 30))
    _finish(_torchrun(data, tmp_path / "whole"))

    killed = _torchrun(data, tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "step_00000001.json").exists():  # written after the .safetensors: complete
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.05)
    _kill_tree(killed.pid)  # every process of the run at once, as a lost machine would
    killed.communicate()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    _finish(_torchrun(data, tmp_path / "resumed", resume=True))

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # 2 epochs of 3 steps; validated on the held-out folder after each epoch
    validations = (tmp_path / "whole" / "validation.csv").read_text().strip().splitlines()
    assert len(validations) == 3  # header + 2 epochs


BATCHNORM_SCRIPT = """
import os, sys, torch
from didicm.config import config_from_dict
from didicm.training import train
out, dist_bn = sys.argv[1], sys.argv[2]
config = config_from_dict({"data": {"dataset": "digits", "val_size": 0.1},
                           "model": {"name": "didirn18", "kwargs": {"width": 8, "stem": "small"}},
                           "optim": {"opt": "adamw", "batch_size": 16, "steps": 6, "warmup_steps": 1},
                           "eval": {"steps": 1}, "device": "cpu", "dist_bn": dist_bn, "output": out})
model = train(config, progress=False, log=lambda *_: None).model
torch.save({k: v for k, v in model.state_dict().items() if "running_" in k},
           os.path.join(out, f"bn_rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_batch_norm_statistics_are_averaged_over_processes_before_they_are_saved(tmp_path):
    script = tmp_path / "bn.py"
    script.write_text(BATCHNORM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    buffers = {}
    for dist_bn in ("reduce", ""):
        out = tmp_path / (dist_bn or "off")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(out), dist_bn], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        buffers[dist_bn] = [torch.load(out / f"bn_rank{r}.pt") for r in (0, 1)]
    saved = load_file(tmp_path / "reduce" / "model.safetensors")
    reduced, untouched = buffers["reduce"], buffers[""]
    assert reduced[0].keys() and reduced[0].keys() == reduced[1].keys()
    for key in reduced[0]:
        assert torch.equal(reduced[0][key], reduced[1][key]), key  # one set of statistics, and it is the saved one
        assert torch.equal(saved[f"model/{key}"], reduced[0][key]), key
    # without it, each process keeps what its own last batch left (the difference the option removes)
    assert any(not torch.equal(untouched[0][k], untouched[1][k]) for k in untouched[0])
