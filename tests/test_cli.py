"""End-to-end: the `didicm` commands on tiny data, checking the values they print and write."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from didicm.cli import main

TRAIN = ["--set", "optim.steps=40", "--set", "optim.batch_size=32", "--set", "optim.opt=adamw",
         "--set", "optim.lr=5e-3", "--set", "optim.warmup_steps=2", "--set", "eval.steps=2",
         "--set", "checkpoint_every=20", "--no-progress"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "didicm"
    assert main(["train", "--model", "didicm:test_resnet", "--dataset", "digits", "--output", str(out), *TRAIN]) == 0
    return out


def test_train_writes_model_and_metrics(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert 20.0 < metrics["val"]["cp:2"]["top1"] <= 100.0
    meta = json.loads((digits_run / "model.json").read_text())
    assert meta["num_classes"] == 10 and meta["classes"][:2] == ["0", "1"] and meta["step"] == 40


def test_eval_reports_each_sampler_with_consistent_values(digits_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", str(digits_run), "--sampler", "cp:1", "--sampler", "cp:4", "--sampler", "cl:2x3",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cp:4" in printed and "cl:2x3" in printed
    results = json.loads(out.read_text())["results"]
    assert results["cp:4"]["evaluations_per_image"] == 4 and results["cl:2x3"]["evaluations_per_image"] == 6
    assert len(results["cp:4"]["step_top1"]) == 5
    assert results["cp:4"]["step_top1"][-1] == pytest.approx(results["cp:4"]["top1"])
    for r in results.values():
        assert 0 <= r["top1"] <= 100 and r["nll"] > 0 and 0 <= r["ece"] <= 1 and 0 <= r["brier"] <= 2
        assert r["count"] == 360  # digits test split: 20% of 1797, stratified


def test_eval_with_degradation_changes_the_result(digits_run, tmp_path):
    clean, blurry = tmp_path / "c.json", tmp_path / "d.json"
    assert main(["eval", str(digits_run), "--sampler", "cp:2", "--json", str(clean)]) == 0
    assert main(["eval", str(digits_run), "--sampler", "cp:2", "--degradation", "resolution=2",
                 "--json", str(blurry)]) == 0
    a = json.loads(clean.read_text())["results"]["cp:2"]
    b = json.loads(blurry.read_text())["results"]["cp:2"]
    assert b["top1"] < a["top1"]


def test_predict_prints_topk_and_plots_the_trajectory(digits_run, tmp_path, capsys):
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(path)
        paths.append(str(path))
    plot = tmp_path / "traj.png"
    assert main(["predict", str(digits_run), *paths, "--topk", "3", "--sampler", "cp:4", "--plot", str(plot)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3
    for line in lines:
        ranked = line.split(": ", 1)[1].split("  (")[0].split(", ")  # "3 0.412, 8 0.201, ..."
        probs = [float(item.rsplit(" ", 1)[1]) for item in ranked]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_clear_line_and_exit_2(digits_run, tmp_path, capsys):
    assert main(["train", "--dataset", "no-such-set", "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "no-such-set" in capsys.readouterr().err
    assert main(["train", "--steps", "0", "--output", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "optim.steps" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(digits_run), "--sampler", "cp:0"]) == 2
    assert "cp:0" in capsys.readouterr().err


def _write_folder_dataset(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 6)):
        for name, level in (("dark", 40), ("bright", 210)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_folder_dataset_train_and_eval(tmp_path):
    _write_folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--model", "test_resnet", "--dataset", f"folder:{tmp_path / 'data'}",
                 "--output", str(out), "--set", "data.image_size=12", *TRAIN]) == 0
    result = json.loads((out / "metrics.json").read_text())["val"]["classifier"]
    assert result["top1"] >= 90.0  # dark vs bright is trivial


def _write_cifar(root):
    rng = np.random.default_rng(1)
    root.mkdir()

    def batch(n):
        labels = rng.integers(0, 10, n)
        data = np.zeros((n, 3 * 32 * 32), np.uint8)
        for i, y in enumerate(labels):  # class y is a constant image of brightness 20 * y
            data[i] = 20 * y + rng.integers(0, 8, 3 * 32 * 32)
        return {b"data": data, b"labels": [int(y) for y in labels]}

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(20)))
    (root / "test_batch").write_bytes(pickle.dumps(batch(20)))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


def test_cifar_pickle_dataset_train(tmp_path):
    _write_cifar(tmp_path / "cifar")
    out = tmp_path / "run"
    assert main(["train", "--model", "test_resnet", "--dataset", f"cifar10:{tmp_path / 'cifar'}",
                 "--output", str(out), "--set", "data.val_size=20", *TRAIN]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"][:3] == ["c0", "c1", "c2"] and meta["in_chans"] == 3 and meta["image_size"] == 32
    assert json.loads((out / "metrics.json").read_text())["val"]["classifier"]["count"] == 20


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "didicm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout


def test_eval_refuses_a_checkpoint_for_another_class_count(digits_run, tmp_path, capsys):
    _write_folder_dataset(tmp_path / "two")
    assert main(["eval", str(digits_run), "--dataset", f"folder:{tmp_path / 'two'}", "--split", "val"]) == 2
    assert "classes" in capsys.readouterr().err


def test_eval_names_a_mismatched_data_set(digits_run, tmp_path, capsys):
    _write_folder_dataset(tmp_path / "rgb")
    assert main(["eval", str(digits_run), "--dataset", f"folder:{tmp_path / 'rgb'}", "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "mismatched data set" in err and "grey" in err and "RGB" in err and err.count("\n") == 1


def test_predict_plot_without_steps_is_refused_before_any_output(digits_run, tmp_path, capsys):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    plot = tmp_path / "p.png"
    assert main(["predict", str(digits_run), str(path), "--sampler", "cl:2x2", "--plot", str(plot)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "--plot" in out.err and not plot.exists()


def test_tta_runs_from_the_cli_and_warnings_are_one_line(tmp_path):
    import warnings

    out = tmp_path / "twin"
    assert main(["train", "--model", "test_resnet", "--dataset", "digits", "--output", str(out), *TRAIN]) == 0
    results = tmp_path / "e.json"
    assert main(["eval", str(out), "--sampler", "classifier", "--sampler", "tta:3", "--limit", "64",
                 "--no-progress", "--json", str(results)]) == 0
    tta = json.loads(results.read_text())["results"]["tta:3"]
    assert tta["evaluations_per_image"] == 3 and tta["count"] == 64
    assert warnings.formatwarning("skipped 1 file", UserWarning, "x.py", 3, "source") == \
        "didicm: warning: skipped 1 file\n"


def test_sigterm_stops_training_cleanly_keeping_checkpoints_and_releasing_the_lock(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "didicm.cli", "train", "--model", "test_resnet", "--dataset", "digits",
               "--output", str(out), "--no-progress", "--set", "optim.steps=100000", "--set", "optim.batch_size=32",
               "--set", "checkpoint_every=5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoints/*.safetensors")) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        assert (out / "train.lock").exists()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "terminated; completed checkpoints are kept" in stderr and "Traceback" not in stderr
    assert not (out / "train.lock").exists()  # the default SIGTERM action would have left it behind
    assert list(out.glob("checkpoints/*.safetensors"))
    assert os.path.getsize(next(out.glob("checkpoints/*.safetensors"))) > 0
