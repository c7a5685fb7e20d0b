"""The first hour of a new user (issue 16): defaults that fit the data, clear errors, fast help."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from didicm import DataError, create_dataset, dataset_info
from didicm.data.inputs import preprocess_of


def _png_folder(root, size=12, classes=("a", "b"), per_class=3, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_folder_input_size_follows_the_images(tmp_path):
    root = _png_folder(tmp_path, size=12)
    assert dataset_info(f"folder:{root}")["image_size"] == 12
    assert create_dataset(f"folder:{root}", "test")[0][0].shape == (3, 12, 12)
    assert create_dataset(f"folder:{root}", "test", image_size=16)[0][0].shape == (3, 16, 16)


def test_large_folder_images_are_capped_at_224(tmp_path):
    root = _png_folder(tmp_path, size=300, per_class=1, splits=("train",))
    assert dataset_info(f"folder:{root}")["image_size"] == 224


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = _png_folder(tmp_path)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        create_dataset(f"folder:{root}", "train")


def test_a_missing_image_file_is_reported_as_missing(tmp_path):
    from didicm.data import load_image

    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_help_answers_without_loading_torch():
    code = "import sys; from didicm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_log_csv_stays_one_row_per_step_across_a_resume(tmp_path, capsys):
    import csv

    from didicm.config import config_from_dict
    from didicm.training import train

    values = {"data": {"dataset": "digits", "val_size": 40}, "output": str(tmp_path),
              "model": {"name": "didirn18_twin", "kwargs": {"width": 4, "stem": "small"}},
              "optim": {"steps": 20, "batch_size": 16, "warmup_steps": 2}, "checkpoint_every": 7}
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(values), progress=False, fault_after_steps=12)  # log row at 10, checkpoint at 7
    train(config_from_dict(values), resume=True, progress=False)
    with (tmp_path / "log.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == [10, 20]

    # validation.csv too: a run stopped after writing a validation's row but before its checkpoint landed
    # validates that step again on resume, and the row is not doubled
    values.update(eval_every=5, eval={"select": "nll"}, output=str(tmp_path / "validated"))
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(values), progress=False, fault_after_steps=10)  # validations at 5 and 10
    newest = sorted((tmp_path / "validated" / "checkpoints").glob("step_*.json"))[-1]
    assert newest.name == "step_00000010.json"
    newest.unlink()  # as if the process died while saving it
    train(config_from_dict(values), resume=True, progress=False)
    with (tmp_path / "validated" / "validation.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == [5, 10, 15, 20]
    first = capsys.readouterr().out.splitlines()[0]  # the start-up line: model, size, steps, device
    assert "didirn18_twin (width 4, stem small)" in first and "input 1x8x8" in first and "20 steps of 16" in first


def test_small_images_get_the_recipe_only_where_nothing_was_set():
    from didicm.recipes import fit_to_data

    values, filled = fit_to_data({"data": {"dataset": "digits"}}, 8)
    assert values["model"]["kwargs"] == {"stem": "small", "width": 16} and values["optim"]["opt"] == "adamw"
    assert "diffusion.t_sampling" in filled
    # a user's optimizer keeps its own settings: nothing of the optimizer group is mixed in
    values, filled = fit_to_data({"optim": {"lr": 5e-3, "steps": 40}, "model": {"name": "didicm:resnet18"}}, 8)
    assert filled == ["optim.batch_size"] and "kwargs" not in values["model"]
    assert fit_to_data({}, 224) == ({}, [])


def test_predict_prepares_a_file_exactly_as_evaluation_does(tmp_path):
    """A folder-trained model evaluates on timm's resize + centre crop; `didicm predict` must feed it the same
    tensor, not the whole image squashed to a square (these files are 40 x 52)."""
    from test_recipes import make_jpegs

    from didicm.data.inputs import load_image_for_model

    root = make_jpegs(tmp_path / "jpegs")
    for transform, geometry in (({}, "center_crop"), ({"crop_mode": "squash", "crop_pct": 0.9}, "squash")):
        evaluation = create_dataset(f"folder:{root}", "test", image_size=32, transform=transform)
        meta = {"in_chans": 3, "image_size": 32, "mean": list(evaluation.mean), "std": list(evaluation.std)}
        assert evaluation.preprocess["geometry"] == geometry
        for index in range(len(evaluation)):
            path = evaluation.samples[index][0]
            expected = evaluation[index][0]
            assert torch.equal(load_image_for_model(path, dict(meta, preprocess=evaluation.preprocess)), expected)
            assert not torch.equal(load_image_for_model(path, meta), expected)  # what predict did before


def test_a_trained_model_records_how_its_files_are_prepared(tmp_path):
    from didicm.checkpoint import load_checkpoint
    from didicm.cli import _dataset_of
    from didicm.config import config_from_dict
    from didicm.training import train

    root = _png_folder(tmp_path, size=12)
    config = config_from_dict({"data": {"dataset": f"folder:{root}", "val_size": 2, "transform": {"crop_pct": 0.9}},
                               "model": {"name": "test_resnet"}, "optim": {"steps": 2, "batch_size": 4},
                               "output": str(tmp_path / "run")})
    train(config, progress=False, log=lambda *_: None)
    meta = load_checkpoint(tmp_path / "run" / "model.safetensors").meta
    assert meta["preprocess"] == {"geometry": "center_crop", "crop_pct": 0.9, "interpolation": "bilinear"}
    assert _dataset_of(meta, "test").preprocess == meta["preprocess"]  # `didicm eval` crops as training did
    # a run saved before models carried it: derived from its data config the same way
    older = {k: v for k, v in meta.items() if k != "preprocess"}
    assert preprocess_of(older) == meta["preprocess"]


@pytest.mark.parametrize("data,expected", [
    ({"dataset": "digits"}, {"geometry": "resize", "interpolation": "bilinear"}),
    ({"dataset": "folder:/not/on/this/machine"}, {"geometry": "center_crop", "crop_pct": 0.875,
                                                  "interpolation": "bilinear"}),
    ({"dataset": "/not/here", "transform": {"interpolation": "bicubic"}},
     {"geometry": "center_crop", "crop_pct": 0.875, "interpolation": "bicubic"}),
    ({"dataset": "imagenet:/not/here"}, {"geometry": "center_crop", "crop_pct": 0.875, "interpolation": "bilinear"}),
    ({"dataset": "folder", "root": "/not/here", "transform": {"crop_mode": "squash", "crop_pct": 0.9}},
     {"geometry": "squash", "crop_pct": 0.9, "interpolation": "bilinear"}),
])
def test_older_checkpoints_are_prepared_as_their_data_set_was(data, expected):
    assert preprocess_of({"config": {"data": data}}) == expected
