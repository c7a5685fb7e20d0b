"""No lost work: a training process killed with SIGKILL and resumed ends with the uninterrupted run's weights;
and training runs as 2 processes with torchrun (gloo on CPU)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from didicm.checkpoint import latest_checkpoint, load_checkpoint

ARGS = ["--model", "didicm:test_resnet", "--dataset", "digits", "--no-progress",
        "--set", "optim.steps=60", "--set", "optim.batch_size=32", "--set", "optim.opt=adamw",
        "--set", "optim.warmup_steps=2", "--set", "checkpoint_every=3", "--set", "eval.steps=1",
        "--set", "optim.ema_decay=0.9"]


def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "didicm.cli", "train", "--output", str(out), *ARGS, *extra]


def _env():
    # one thread per process keeps the kernels' reduction order fixed between the runs being compared
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _final_weights(out: Path) -> dict:
    return load_checkpoint(out / "model.safetensors").section("model")


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_command(straight), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.Popen(_train_command(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait for the first checkpoint, then kill at a random moment (possibly mid-write of a later one)
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before the kill: make it longer"
    assert latest_checkpoint(killed) is not None

    subprocess.run(_train_command(killed, "--resume"), check=True, env=_env(), capture_output=True)
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_process_training_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "didicm.cli", "train", "--output", str(out), *ARGS, "--set", "optim.steps=6"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = load_checkpoint(out / "model.safetensors").meta
    assert meta["world_size"] == 2 and meta["step"] == 6
    weights = _final_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
