"""Fuzz the data layer: hostile files and tensors either work or raise a DidicmError, nothing else escapes."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from didicm.data import create_dataset, parse_degradation, safe_loads
from didicm.errors import DidicmError

# DIDICM_FUZZ_EXAMPLES raises the number of examples for a longer hunt; the default keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("DIDICM_FUZZ_EXAMPLES", "25")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _valid_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


# Random bytes, or a real PNG cut short or with flipped bytes: the second kind gets past the header check.
_png = _valid_png(100)
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda cut: _png[:cut], st.integers(0, len(_png))),
    st.builds(lambda pos, val: _png[:pos] + bytes([val]) + _png[pos + 1:], st.integers(0, len(_png) - 1),
              st.integers(0, 255)),
)


@FUZZ
@given(contents=st.lists(file_bytes, min_size=1, max_size=4), mode=st.sampled_from(["skip", "fail"]),
       suffix=st.sampled_from([".png", ".jpg", ".JPEG", ".gif"]))
def test_random_image_files_work_or_raise_didicm_error(contents, mode, suffix):
    root = Path(tempfile.mkdtemp())
    try:
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (root / split / cls).mkdir(parents=True)
                (root / split / cls / "good.png").write_bytes(_valid_png(50))
        for i, data in enumerate(contents):
            (root / "train" / ("a", "b")[i % 2] / f"fuzz{i}{suffix}").write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = create_dataset(f"folder:{root}", "train", image_size=8, val_size=0, on_bad_image=mode,
                                    degradation="noise=0.05")
                for index in range(len(ds)):
                    image, label = ds[index]
                    assert image.shape == (3, 8, 8) and torch.isfinite(image).all() and label in (0, 1)
            except DidicmError:
                assert mode == "fail"  # 'skip' always has the readable good.png files to fall back on
    finally:
        shutil.rmtree(root)


pixel_value = st.one_of(st.floats(min_value=-2, max_value=2, width=32), st.sampled_from([float("nan"), float("inf")]))


@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=2, max_size=5), fill=pixel_value,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64]),
       scale=st.sampled_from([1.0, 1.5]),
       spec=st.sampled_from(["resolution=3", "noise=0.3", "blur=1.5", "jpeg=20",
                             "resolution=2,noise=0.1,blur=0.5,jpeg=50"]),
       index=st.one_of(st.none(), st.integers(0, 2**62)))
def test_random_tensors_through_degradations(shape, fill, dtype, scale, spec, index):
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(shape, generator=generator) * scale).to(dtype)
    if images.numel() and torch.is_floating_point(images):
        images.view(-1)[0] = fill
    batch = len(shape) == 4 and shape[0] > 0
    try:
        out = parse_degradation(spec, seed=1)(images, index=[index] * shape[0] if batch and index is not None
                                              else index)
    except DidicmError:
        return
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_pickles(data):
    try:
        safe_loads(data)
    except DidicmError:
        pass


@FUZZ
@given(spec=st.text(alphabet="resolutinbjpgz=,.0123456789-e ", max_size=30))
def test_random_specs_parse_or_raise_config_error(spec):
    try:
        pipeline = parse_degradation(spec)
    except DidicmError:
        return
    out = pipeline(torch.full((1, 8, 8), 0.5), index=0)
    assert out.shape == (1, 8, 8) and torch.isfinite(out).all()


def test_fuzz_inputs_include_a_working_case():
    # The fuzzers above would pass vacuously if every input raised; this pins that the common path works.
    out = parse_degradation("resolution=2,noise=0.1,blur=0.5,jpeg=50", seed=1)(torch.rand(2, 3, 9, 9), index=[0, 1])
    assert out.shape == (2, 3, 9, 9) and np.isfinite(out.numpy()).all()
