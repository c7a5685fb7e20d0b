"""Tables, the atomic JSON writer, and the figures (each a readable PNG of the promised size)."""

import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from didicm.diffusion import CPSampler, LogLinearSchedule, UniformDiffusion
from didicm.errors import InputError
from didicm.metrics import reliability_bins
from didicm.report import (
    format_table,
    markdown_table,
    plot_accuracy_vs_steps,
    plot_gap,
    plot_reliability,
    plot_trajectories_grid,
    plot_trajectory,
    to_plain,
    write_json,
)

ROWS = [
    {"method": "twin", "top1": 91.234, "nll": 0.25, "steps": 1},
    {"method": "DiDiCM", "top1": 92.5, "nll": 0.2, "steps": 8, "note": "CP"},
]


# ---- tables ------------------------------------------------------------------------------------------------------
def test_format_table_aligns_numbers_right_text_left_with_shared_decimals():
    expected = "\n".join([
        "results",
        "method   top1     nll  steps  note",
        "------  -----  ------  -----  ----",
        "twin    91.23  0.2500      1  -",
        "DiDiCM  92.50  0.2000      8  CP",
    ])
    assert format_table(ROWS, title="results") == expected


def test_format_table_columns_pick_and_order_and_convert_scalars():
    rows = [{"a": torch.tensor(0.5), "b": np.float32(2.0), "c": "x y\nz"},
            {"a": float("nan"), "b": None, "c": 3}]
    lines = format_table(rows, columns=["c", "a", "b"]).splitlines()
    assert lines[0].split() == ["c", "a", "b"]
    assert lines[2].split() == ["x", "y", "z", "0.5000", "2.000"]  # tensor and numpy scalars print as numbers
    assert lines[3].split() == ["3", "nan", "-"]
    # every row of a fully numeric table has the same width (right-aligned)
    numeric = format_table([{"x": 1.5, "y": 10}, {"x": 123.25, "y": 7}]).splitlines()
    assert len({len(line) for line in numeric}) == 1
    assert numeric[2] == "  1.50  10" and numeric[3] == "123.25   7"


def test_format_table_uses_scientific_notation_for_tiny_or_huge_columns():
    text = format_table([{"lr": 1e-6, "flops": 3.2e9}, {"lr": 5e-5, "flops": 1.0e9}])
    assert "1.000e-06" in text and "5.000e-05" in text and "3.200e+09" in text


def test_markdown_table():
    expected = "\n".join([
        "**results**",
        "",
        "| method | top1 | note |",
        "|:---|---:|:---|",
        "| twin | 91.23 | - |",
        "| DiDiCM | 92.50 | a\\|b |",
    ])
    rows = [dict(ROWS[0]), dict(ROWS[1], note="a|b")]
    assert markdown_table(rows, columns=["method", "top1", "note"], title="results") == expected


def test_table_errors():
    with pytest.raises(InputError, match="appear in no row"):
        format_table(ROWS, columns=["method", "top-1"])
    with pytest.raises(InputError, match="list of dicts"):
        format_table([["twin", 91.2]])
    with pytest.raises(InputError, match="nothing to tabulate"):
        markdown_table([])
    assert format_table([], columns=["a", "b"]).splitlines() == ["a  b", "-  -"]


# ---- JSON --------------------------------------------------------------------------------------------------------
def test_to_plain_converts_tensors_numpy_and_non_finite():
    plain = to_plain({"t": torch.tensor([[1, 2]]), "s": torch.tensor(2.5), "n": np.int64(3), "a": np.arange(2),
                      "p": Path("x/y"), 4: (1.0, float("inf")), "nan": float("nan"), "set": {2, 1}})
    assert plain == {"t": [[1, 2]], "s": 2.5, "n": 3, "a": [0, 1], "p": "x/y", "4": [1.0, None], "nan": None,
                     "set": [1, 2]}
    assert type(plain["n"]) is int and type(plain["s"]) is float
    with pytest.raises(InputError, match="object"):
        to_plain({"bad": object()})


def test_write_json_round_trips_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "runs" / "cell" / "result.json"  # parents are created
    obj = {"top1": torch.tensor(91.5, dtype=torch.float64), "curve": torch.tensor([1.0, 2.0]),
           "steps": np.array([1, 2, 4]), "ece": np.float64(0.0123), "notes": ("a", "b")}
    assert write_json(target, obj) == target
    assert json.loads(target.read_text()) == {"top1": 91.5, "curve": [1.0, 2.0], "steps": [1, 2, 4],
                                              "ece": 0.0123, "notes": ["a", "b"]}
    assert os.listdir(target.parent) == ["result.json"]
    assert target.stat().st_mode & 0o777 == 0o644
    write_json(target, {"top1": 92.0})  # overwrite in place
    assert json.loads(target.read_text()) == {"top1": 92.0}
    assert os.listdir(target.parent) == ["result.json"]


def test_write_json_failure_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_json(target, {"top1": 1.0})
    with pytest.raises(InputError):
        write_json(target, {"model": object()})  # fails before any file is touched
    assert json.loads(target.read_text()) == {"top1": 1.0}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json(target, {"top1": 2.0})
    assert json.loads(target.read_text()) == {"top1": 1.0}
    assert os.listdir(tmp_path) == ["result.json"]


# ---- figures -----------------------------------------------------------------------------------------------------
NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal"]


def read_png(path, width, height):
    """Reads the PNG back and checks its size and that it is not blank."""
    assert path.is_file() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    return pixels


def sample_trajectories(batch=3, steps=4, seed=0):
    """[B, S+1, K] trajectories from the real CP sampler fed the exact score of known posteriors."""
    generator = torch.Generator().manual_seed(seed)
    posterior = (3 * torch.randn(batch, len(NAMES), generator=generator, dtype=torch.float64)).softmax(dim=1)
    diffusion = UniformDiffusion(len(NAMES), LogLinearSchedule())

    def exact_score(x, c, sigma):
        p_t = diffusion.noise_probs(posterior, sigma.double())
        return (p_t.log() - p_t.gather(1, c.reshape(-1, 1)).log()).float()

    final, trajectory = CPSampler(diffusion, steps=steps).run(exact_score, torch.zeros(batch, 1),
                                                              return_trajectory=True)
    return trajectory, posterior


def test_plot_reliability(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (400,), generator=generator)
    logits = torch.randn(400, 6, generator=generator)
    logits[torch.arange(400), labels] += 1.5
    bins = {"twin": reliability_bins((3 * logits).softmax(1), labels),
            "DiDiCM": reliability_bins(logits.softmax(1), labels, bins=10)}
    path = plot_reliability(bins, tmp_path / "rel.png", title="hardest cell")
    read_png(path, width=640, height=400)  # default (3.2 * methods, 4.0) inches at 100 dpi
    path = plot_reliability({"twin": bins["twin"]}, tmp_path / "one.png", figsize=(4, 5), dpi=50)
    read_png(path, width=200, height=250)
    with pytest.raises(InputError, match="lack"):
        plot_reliability({"twin": {"edges": [0, 1]}}, tmp_path / "bad.png")


def test_plot_accuracy_vs_steps(tmp_path):
    curves = {"CP": ([1, 2, 4, 8, 16], [80.1, 85.2, 86.0, 86.3, 86.4]), "CL": (np.array([8]), np.array([81.0]))}
    path = plot_accuracy_vs_steps(curves, {"twin": 85.5}, tmp_path / "steps.png")
    read_png(path, width=600, height=400)
    with pytest.raises(InputError, match="one per step"):
        plot_accuracy_vs_steps({"CP": ([1, 2], [80.0])}, {}, tmp_path / "bad.png")


def test_plot_trajectory_from_the_cp_sampler(tmp_path):
    trajectory, posterior = sample_trajectories(batch=1)
    assert torch.allclose(trajectory[0, 0], torch.full((6,), 1 / 6))  # sanity: starts uniform
    true_label = int(posterior[0].argmin())  # the least probable class still gets its own band
    path = plot_trajectory(trajectory[0], NAMES, tmp_path / "traj.png", image=torch.rand(1, 28, 28),
                           true_label=true_label, max_classes=3)
    read_png(path, width=800, height=300)
    path = plot_trajectory(trajectory[0].numpy(), NAMES, tmp_path / "plain.png", figsize=(5, 2), dpi=80)
    read_png(path, width=400, height=160)
    with pytest.raises(InputError, match="one name per class"):
        plot_trajectory(trajectory[0], NAMES[:-1], tmp_path / "bad.png")
    with pytest.raises(InputError, match="outside"):
        plot_trajectory(trajectory[0], NAMES, tmp_path / "bad.png", true_label=6)


def test_plot_trajectories_grid_accepts_chw_hwc_uint8_and_normalized_images(tmp_path):
    trajectories, _ = sample_trajectories(batch=3)
    images = [torch.rand(3, 16, 16), (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8),
              torch.randn(1, 16, 16)]  # CHW colour, HWC uint8, normalized grey (stretched for display)
    path = plot_trajectories_grid(images, trajectories, NAMES, [0, 1, 2], tmp_path / "grid.png")
    read_png(path, width=800, height=660)  # default (8, 2.2 * rows)
    path = plot_trajectories_grid(torch.rand(3, 1, 16, 16), trajectories, NAMES, None, tmp_path / "nolabels.png")
    read_png(path, width=800, height=660)
    with pytest.raises(InputError, match="one label per row"):
        plot_trajectories_grid(images, trajectories, NAMES, [0, 1], tmp_path / "bad.png")
    with pytest.raises(InputError, match="an image must be"):
        plot_trajectories_grid([torch.rand(2, 5, 16, 16)] * 3, trajectories, NAMES, None, tmp_path / "bad.png")


def test_plot_gap(tmp_path):
    axes = {"resolution": (["28 px", "14 px", "7 px"], [0.1, 0.8, 2.3], [0.2, 0.3, 0.4]),
            "data ratio": ([1.0, 0.1, 0.02], np.array([-0.2, 0.5, 1.1]), None)}
    path = plot_gap(axes, tmp_path / "gap.png", title="DiDiCM lead")
    read_png(path, width=600, height=400)
    with pytest.raises(InputError, match="as many mean gaps"):
        plot_gap({"resolution": ([28, 14], [0.1], None)}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
