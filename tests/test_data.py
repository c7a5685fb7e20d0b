"""Data sets, degradations, splits and subsets: values checked against slow references and known files."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from didicm.data import (
    FASHION_MNIST_ROOT,
    BadImageWarning,
    BatchAugment,
    class_balanced_subset,
    create_dataset,
    dataset_info,
    parse_degradation,
    read_idx,
    safe_loads,
    stratified_split,
)
from didicm.errors import ConfigError, DataError, InputError


# ---- helpers that write small data sets ---------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_dir(directory: Path, compress: bool, n_train: int = 40, n_test: int = 10, size: int = 6) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 4,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 4,
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, compress)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the cPickle that wrote CIFAR's files did."""

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_style_dumps(obj: dict) -> bytes:
    """A protocol-2 pickle shaped like CIFAR's: str keys and names as byte strings, numpy 1 module names."""
    def to_bytes(value):
        if isinstance(value, str):
            return value.encode("latin1")
        if isinstance(value, list):
            return [to_bytes(v) for v in value]
        return value

    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump({to_bytes(k): to_bytes(v) for k, v in obj.items()})
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar_dir(directory: Path, num_classes: int, protocol: int | str, per_batch: int = 6) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    names = [f"class{i}" for i in range(num_classes)]
    made = {}

    def dumps(obj):
        return py2_style_dumps(obj) if protocol == "py2" else pickle.dumps(obj, protocol=protocol)

    def dump(name, labels_key, n):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(i % num_classes) for i in range(n)]
        (directory / name).write_bytes(dumps({"data": data, labels_key: labels, "filenames": ["x"] * n}))
        made[name] = (data, labels)

    if num_classes == 10:
        (directory / "batches.meta").write_bytes(dumps({"label_names": names}))
        for i in range(1, 6):
            dump(f"data_batch_{i}", "labels", per_batch)
        dump("test_batch", "labels", per_batch)
    else:
        (directory / "meta").write_bytes(dumps({"fine_label_names": names, "coarse_label_names": ["a"]}))
        dump("train", "fine_labels", 2 * num_classes)
        dump("test", "fine_labels", num_classes)
    return made


def make_folder(root: Path) -> dict:
    """train/{cat,dog}/ and val/{cat,dog}/ with images in several modes, one non-image and one truncated PNG."""
    files = {}
    for split, count in (("train", 5), ("val", 2)):
        for cls_index, cls in enumerate(("cat", "dog")):
            directory = root / split / cls
            directory.mkdir(parents=True)
            for i in range(count):
                value = 40 * (i + 1) + cls_index
                path = directory / f"img{i}.png"
                Image.new("RGB", (10, 12), (value, value, value)).save(path)
                files[path] = value
    # Unusual modes, each a constant image whose expected 8-bit grey value is known.
    Image.new("L", (9, 9), 200).save(root / "train" / "cat" / "grey.png")
    Image.new("RGBA", (9, 9), (10, 20, 30, 0)).save(root / "train" / "cat" / "rgba.png")
    Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)).save(root / "train" / "dog" / "deep16.png")
    palette = Image.new("P", (9, 9), 3)
    palette.putpalette([0, 0, 0] * 3 + [90, 90, 90] + [0, 0, 0] * 252)
    palette.save(root / "train" / "dog" / "palette.png")
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return files


def assert_partition(parts: list[np.ndarray], total: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == total and len(np.unique(joined)) == total


# ---- digits, splits and subsets --------------------------------------------------------------------------
def test_digits_shapes_classes_and_disjoint_splits():
    train, val, test = (create_dataset("digits", split) for split in ("train", "val", "test"))
    # 1797 images: 20% test (360), 10% of the remaining 1437 for val (ceil -> 144), the rest train.
    assert (len(train), len(val), len(test)) == (1293, 144, 360)
    for ds in (train, val, test):
        image, label = ds[3]
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < 10
        assert ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10 and ds.in_chans == 1
        assert ds.image_size == 8 and ds.targets.dtype == torch.int64
    # train and val are carved from the same pool (stream 0) and must not share an image.
    assert_partition([train.source_index, val.source_index], 1437)
    assert test.stream == 1 and train.stream == val.stream == 0
    # The test split is stratified: every class has 35-37 test images.
    assert set(torch.bincount(test.targets).tolist()) <= {35, 36, 37}
    # Normalization: the train pixels have about mean 0, std 1 with digits' documented constants.
    images, _ = train.tensors()
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


def test_digits_items_match_sklearn_pixels():
    from sklearn.datasets import load_digits

    test = create_dataset("digits", "test")
    images, labels = test.tensors()
    pixels = images * test.std[0] + test.mean[0]  # undo normalization -> [0, 1]
    bunch = load_digits()
    raw = np.rint(bunch.images * 255 / 16) / 255
    # Every test image is one of sklearn's images with the same label.
    for row in (0, 100, 359):
        matches = np.flatnonzero(np.abs(raw - pixels[row, 0].numpy()).max(axis=(1, 2)) < 1e-5)
        assert len(matches) >= 1 and bunch.target[matches[0]] == labels[row]


def test_val_split_is_stratified_fixed_and_size_options():
    labels = np.repeat(np.arange(5), 40)
    train, val = stratified_split(labels, 50)
    assert len(val) == 50 and set(np.bincount(labels[val])) == {10}
    assert_partition([train, val], 200)
    train2, val2 = stratified_split(labels, 50)
    assert np.array_equal(val, val2)
    assert len(stratified_split(labels, 0.1)[1]) == 20
    assert len(stratified_split(labels, 0)[1]) == 0
    for bad in (-1, 200, 1.5, 0.0, "10", True):
        with pytest.raises(ConfigError):
            stratified_split(labels, bad)
    with pytest.raises(ConfigError):
        stratified_split(labels, 3)  # fewer val images than classes: cannot stratify


def test_subset_is_per_class_proportional_reproducible_and_nested():
    labels = np.concatenate([np.full(n, c) for c, n in enumerate((100, 50, 20, 3))])
    np.random.default_rng(0).shuffle(labels)
    subset = class_balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[subset], minlength=4).tolist() == [10, 5, 2, 1]  # at least one per class
    assert np.array_equal(subset, class_balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, class_balanced_subset(labels, 0.1, seed=4))
    assert np.all(np.diff(subset) > 0)
    larger = class_balanced_subset(labels, 0.5, seed=3)
    assert np.bincount(labels[larger], minlength=4).tolist() == [50, 25, 10, 2]
    assert set(subset) <= set(larger)  # nested: a smaller ratio cuts the same per-class order shorter
    assert np.array_equal(class_balanced_subset(labels, 1.0), np.arange(len(labels)))
    for bad in (0, -0.1, 1.01, float("nan"), "0.5"):
        with pytest.raises(ConfigError):
            class_balanced_subset(labels, bad)


def test_create_dataset_subset_is_identical_across_calls_and_degradations():
    first = create_dataset("digits", "train", data_ratio=0.2, seed=5)
    again = create_dataset("digits", "train", data_ratio=0.2, seed=5, degradation="noise=0.2", augment=True)
    assert np.array_equal(first.source_index, again.source_index)
    assert torch.equal(first.targets, again.targets)
    full = create_dataset("digits", "train")
    expected = [max(1, int(np.floor(0.2 * n + 0.5))) for n in torch.bincount(full.targets).tolist()]
    assert torch.bincount(first.targets).tolist() == expected
    assert set(first.source_index) <= set(full.source_index)
    # data_ratio never touches val or test.
    assert len(create_dataset("digits", "test", data_ratio=0.2)) == 360
    assert len(create_dataset("digits", "val", data_ratio=0.2)) == 144


def test_tensors_fast_path_equals_getitem_with_noise_and_resize():
    ds = create_dataset("digits", "val", image_size=12, degradation="resolution=4,noise=0.1,jpeg=80", seed=2)
    images, labels = ds.tensors()
    assert images.shape == (144, 1, 12, 12) and torch.equal(labels, ds.targets)
    for row in (0, 7, 143):
        image, label = ds[row]
        torch.testing.assert_close(image, images[row], atol=1e-5, rtol=0)
        assert label == labels[row]
    assert torch.isfinite(images).all()
    # The same image is degraded identically by a fresh dataset object, whatever the run seed (the subset seed).
    torch.testing.assert_close(create_dataset("digits", "val", image_size=12, seed=9,
                                              degradation="resolution=4,noise=0.1,jpeg=80").tensors()[0], images)
    # A training image gets the same noise whichever subset it lands in.
    full = create_dataset("digits", "train", degradation="noise=0.2")
    part = create_dataset("digits", "train", degradation="noise=0.2", data_ratio=0.1, seed=4)
    row_in_full = {int(s): i for i, s in enumerate(full.source_index)}
    for row in (0, 5):
        torch.testing.assert_close(part[row][0], full[row_in_full[int(part.source_index[row])]][0])


def test_augment_only_on_train_and_flip_policy():
    assert create_dataset("digits", "train", augment=True).augment
    assert not create_dataset("digits", "test", augment=True).augment
    assert not create_dataset("digits", "train", augment=True).hflip  # mirrored digits are not digits


def test_batch_augment_shifts_within_padding_and_pads_with_fill():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    augment = BatchAugment(padding=1, hflip=False, fill=[-5.0])
    out = augment(images, generator=torch.Generator().manual_seed(0))
    padded = F.pad(images, (1, 1, 1, 1), value=-5.0)
    for b in range(2):
        windows = [padded[b, :, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[b], w) for w in windows)
    # Over many draws every one of the 9 offsets appears and flips happen only when enabled.
    many = images[:1].expand(200, 1, 6, 6)
    shifted = BatchAugment(1, False, [-5.0])(many, generator=torch.Generator().manual_seed(1))
    offsets = {(int((s == -5).all(dim=-1).any()), int((s == -5).all(dim=-2).any())) for s in shifted[:, 0]}
    assert len(offsets) > 1
    flipped = BatchAugment(0, True, [0.0])(many, generator=torch.Generator().manual_seed(2))
    n_flipped = sum(torch.equal(f, images[0].flip(-1)) for f in flipped)
    assert 60 < n_flipped < 140 and all(torch.equal(f, images[0]) or torch.equal(f, images[0].flip(-1))
                                        for f in flipped)


# ---- IDX and Fashion-MNIST -------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_and_dataset(tmp_path, compress):
    arrays = make_idx_dir(tmp_path / "idx", compress)
    suffix = ".gz" if compress else ""
    assert np.array_equal(read_idx(tmp_path / "idx" / f"train-images-idx3-ubyte{suffix}"),
                          arrays["train-images-idx3-ubyte"])
    test = create_dataset(f"idx:{tmp_path / 'idx'}", "test")
    images, labels = test.tensors()
    pixels = images * test.std[0] + test.mean[0]
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()[:, None] / 255
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == (np.arange(10) % 4).tolist()
    # Generic IDX sets are normalized with their own training statistics.
    train_pixels = arrays["train-images-idx3-ubyte"] / 255
    assert test.mean[0] == pytest.approx(train_pixels.mean()) and test.std[0] == pytest.approx(train_pixels.std())
    # A bare directory is recognized, and dataset_info agrees with the data set.
    train = create_dataset(str(tmp_path / "idx"), "train", val_size=8)
    assert len(train) == 32 and train.classes == ["0", "1", "2", "3"]
    assert dataset_info(str(tmp_path / "idx")) == dict(num_classes=4, in_chans=1, image_size=6,
                                                        classes=["0", "1", "2", "3"])


def test_idx_truncated_and_bad_magic_raise_data_error(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        create_dataset(f"idx:{tmp_path}", "train")
    gz = tmp_path / "broken-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20)[:-6])
    with pytest.raises(DataError):
        read_idx(gz)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_sizes():
    train = create_dataset("fashion-mnist", "train")
    val = create_dataset("fashion-mnist", "val")
    test = create_dataset("fashion-mnist", "test")
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert len(train) + len(val) == 60000
    assert torch.bincount(val.targets).tolist() == [500] * 10
    assert train[0][0].shape == (1, 28, 28) and test.classes[9] == "Ankle boot"
    small = create_dataset("fashion-mnist", "train", data_ratio=0.02)
    assert torch.bincount(small.targets).tolist() == [110] * 10


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    import didicm.data.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_ROOT", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        create_dataset("fashion-mnist", "train")


# ---- CIFAR and the safe unpickler ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 5, "py2"])
def test_cifar10_pickles(tmp_path, protocol):
    made = make_cifar_dir(tmp_path / "c10", 10, protocol)
    train = create_dataset(f"cifar10:{tmp_path / 'c10'}", "train", val_size=0)
    test = create_dataset("cifar10", "test", root=str(tmp_path / "c10"))
    assert len(train) == 30 and len(test) == 6 and train.in_chans == 3 and train.image_size == 32
    assert train.classes == [f"class{i}" for i in range(10)]
    data, labels = made["test_batch"]
    image, label = test[4]
    pixels = image * torch.tensor(test.std).view(3, 1, 1) + torch.tensor(test.mean).view(3, 1, 1)
    # CIFAR rows: 1024 red, 1024 green, 1024 blue values.
    torch.testing.assert_close(pixels, torch.from_numpy(data[4].reshape(3, 32, 32)).float() / 255, atol=1e-5, rtol=0)
    assert label == labels[4]
    assert dataset_info(str(tmp_path / "c10"))["num_classes"] == 10


def test_cifar100_pickles(tmp_path):
    make_cifar_dir(tmp_path / "c100", 100, protocol=2)
    ds = create_dataset(str(tmp_path / "c100"), "train", val_size=0)
    assert ds.num_classes == 100 and len(ds) == 200
    assert torch.bincount(ds.targets).tolist() == [2] * 100


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="system"):
        safe_loads(evil)
    make_cifar_dir(tmp_path / "c10", 10, protocol=2)
    (tmp_path / "c10" / "data_batch_3").write_bytes(evil)
    with pytest.raises(DataError, match="not a safe data pickle"):
        create_dataset(f"cifar10:{tmp_path / 'c10'}", "train")
    assert not marker.exists()
    # Other escapes are refused too: object arrays, codecs other than latin1, truncated streams.
    with pytest.raises(DataError):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    with pytest.raises(DataError):
        safe_loads(pickle.dumps(eval, protocol=2))
    with pytest.raises(DataError, match="truncated"):
        safe_loads(pickle.dumps({"a": np.zeros(3)}, protocol=2)[:-4])
    assert np.array_equal(safe_loads(pickle.dumps({"a": np.arange(4)}, protocol=2))["a"], np.arange(4))


# ---- folders ------------------------------------------------------------------------------------------------
def _pixel_values(ds, image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(ds.std).view(3, 1, 1) + torch.tensor(ds.mean).view(3, 1, 1)


def test_folder_modes_are_converted_and_values_kept(tmp_path):
    make_folder(tmp_path)
    ds = create_dataset(f"folder:{tmp_path}", "train", image_size=8, val_size=0)
    assert ds.classes == ["cat", "dog"] and len(ds) == 14 and ds.in_chans == 3  # notes.txt ignored
    names = [path.name for path, _ in ds.samples]
    expected = {"grey.png": (200, 200, 200), "rgba.png": (10, 20, 30), "deep16.png": (255, 255, 255),
                "palette.png": (90, 90, 90), "img2.png": None}
    for name, rgb in expected.items():
        index = names.index(name)
        image, label = ds[index]
        assert image.shape == (3, 8, 8) and torch.isfinite(image).all()
        pixels = _pixel_values(ds, image)
        if rgb is not None:
            torch.testing.assert_close(pixels, torch.tensor(rgb).float().view(3, 1, 1).expand(3, 8, 8) / 255,
                                       atol=1e-4, rtol=0)
        assert label == ds.targets[index]
    test = create_dataset(str(tmp_path), "test", image_size=8)
    assert len(test) == 4 and test.targets.tolist() == [0, 0, 1, 1]
    info = dataset_info(f"folder:{tmp_path}")
    assert info == dict(num_classes=2, in_chans=3, image_size=10, classes=["cat", "dog"])  # the files' native size
    assert not hasattr(test, "tensors")  # file-backed: loaders must stream it, never stack it whole
    augmented = create_dataset(str(tmp_path), "train", image_size=8, augment=True, val_size=0)
    assert augmented[0][0].shape == (3, 8, 8)


def test_folder_bad_files_skip_and_fail(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "fake.png").write_bytes(b"this is not a png at all")
    good = tmp_path / "train" / "dog" / "img0.png"
    truncated = tmp_path / "train" / "dog" / "zz_truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])  # header fine, data cut: only decoding finds it
    with pytest.warns(BadImageWarning, match="skipped 2 unreadable"):
        ds = create_dataset(str(tmp_path), "train", image_size=8, val_size=0, on_bad_image="skip")
    assert len(ds) == 14 and {Path(p).name for p, _ in ds.bad_files} == {"fake.png", "zz_truncated.png"}

    # A file that turns bad after construction: 'skip' substitutes the next readable image and counts it.
    target = next(i for i, (p, _) in enumerate(ds.samples) if p.name == "img3.png" and p.parent.name == "cat")
    ds.samples[target][0].write_bytes(b"corrupted later")
    with pytest.warns(BadImageWarning, match="substituting"):
        image, label = ds[target]
    replacement, replacement_label = ds[target + 1]
    torch.testing.assert_close(image, replacement)
    assert label == replacement_label and len(ds.bad_files) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second bad read is only recorded
        ds[target]

    with pytest.raises(DataError, match="fake.png"):
        fail = create_dataset(str(tmp_path), "train", image_size=8, val_size=0, on_bad_image="fail")
        for index in range(len(fail)):
            fail[index]


# ---- degradations -------------------------------------------------------------------------------------------
def slow_area_then_bilinear(image: np.ndarray, r: int) -> torch.Tensor:
    """Reference: average each (H/r x W/r) block in a Python loop, then bilinear upsampling."""
    chans, height, width = image.shape
    bh, bw = height // r, width // r
    small = np.zeros((chans, r, r))
    for c in range(chans):
        for i in range(r):
            for j in range(r):
                small[c, i, j] = image[c, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].mean()
    return F.interpolate(torch.from_numpy(small)[None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[0]


@pytest.mark.parametrize("r", [7, 14, 4])
def test_resolution_equals_block_average_then_bilinear(r):
    image = np.random.default_rng(0).random((2, 28, 28)).astype(np.float32)
    out = parse_degradation(f"resolution={r}")(torch.from_numpy(image))
    torch.testing.assert_close(out, slow_area_then_bilinear(image, r), atol=1e-5, rtol=0)
    assert out.shape == (2, 28, 28)
    same = parse_degradation("resolution=28")(torch.from_numpy(image))
    assert torch.equal(same, torch.from_numpy(image))  # at full resolution nothing changes


def test_noise_reproducible_by_index_with_requested_std():
    grey = torch.full((1, 64, 64), 0.5)
    noise = parse_degradation("noise=0.1", seed=7)
    a, b, c = noise(grey, index=3), noise(grey, index=3), noise(grey, index=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - grey).std().item() == pytest.approx(0.1, rel=0.05)
    assert abs((a - grey).mean().item()) < 0.01
    # Batches give the same result per image as single calls (and different seeds differ).
    batch = noise(grey.expand(3, 1, 64, 64).clone(), index=[4, 3, 9])
    assert torch.equal(batch[0], c) and torch.equal(batch[1], a)
    assert not torch.equal(parse_degradation("noise=0.1", seed=8)(grey, index=3), a)
    # Different files (streams) get different noise for the same index.
    assert not torch.equal(noise(grey, index=3, stream=1), a)
    assert noise(torch.ones(1, 8, 8), index=0).max() <= 1 and noise(torch.zeros(1, 8, 8), index=0).min() >= 0


def test_blur_spreads_an_impulse_with_the_requested_sigma():
    impulse = torch.zeros(1, 31, 31)
    impulse[0, 15, 15] = 1.0
    out = parse_degradation("blur=2.0")(impulse)[0].double()
    coords = torch.arange(31, dtype=torch.float64) - 15
    mass = out.sum()
    assert mass.item() == pytest.approx(1.0, abs=1e-3)
    variance_x = (out.sum(0) * coords ** 2).sum() / mass
    assert variance_x.item() == pytest.approx(4.0, rel=0.03)
    constant = torch.full((3, 5, 5), 0.3)
    torch.testing.assert_close(parse_degradation("blur=10")(constant), constant)  # kernel capped, still a blur


def test_jpeg_quality_orders_the_error_and_is_deterministic():
    rng = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=rng), size=(32, 32), mode="bilinear")[0]
    high = parse_degradation("jpeg=95")(smooth)
    low = parse_degradation("jpeg=5")(smooth)
    assert torch.equal(low, parse_degradation("jpeg=5")(smooth))
    assert (high - smooth).abs().mean() < (low - smooth).abs().mean()
    assert (high - smooth).abs().mean() < 0.03  # chroma subsampling costs colour detail even at q=95
    grey = parse_degradation("jpeg=95")(smooth[:1])
    assert grey.shape == (1, 32, 32) and (grey - smooth[:1]).abs().max() < 0.02
    with pytest.raises(InputError, match="1 or 3 channels"):
        parse_degradation("jpeg=50")(torch.rand(2, 8, 8))


def test_composed_spec_applies_in_order():
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    composed = parse_degradation("resolution=7,blur=1.0")(image)
    stepwise = parse_degradation("blur=1.0")(parse_degradation("resolution=7")(image))
    torch.testing.assert_close(composed, stepwise)
    assert str(parse_degradation("resolution=7,noise=0.1")) == "resolution=7,noise=0.1"
    assert len(parse_degradation(None)) == len(parse_degradation("none")) == 0


@pytest.mark.parametrize("spec", ["sharpen=2", "noise", "noise=abc", "noise=-0.1", "resolution=0", "resolution=3.5",
                                  "jpeg=0", "jpeg=101", "blur=-1", "noise=nan", "noise=0.1,noise=0.2", "=3",
                                  "resolution=7,,noise=0.1"])
def test_bad_degradation_specs_raise_config_error(spec):
    with pytest.raises(ConfigError):
        parse_degradation(spec)


def test_degradation_rejects_bad_tensors():
    noise = parse_degradation("noise=0.1")
    for bad in (torch.zeros(1, 4, 4, dtype=torch.uint8), torch.full((1, 4, 4), float("nan")),
                torch.full((1, 4, 4), 2.0), torch.zeros(4, 4), torch.zeros(0, 1, 4, 4)):
        with pytest.raises(InputError):
            noise(bad, index=0)
    with pytest.raises(InputError, match="indices"):
        noise(torch.zeros(2, 1, 4, 4), index=[1])


# ---- errors from create_dataset -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error", [
    (dict(name="imagenet-21k-please"), DataError),
    (dict(name="folder:/no/such/dir"), DataError),
    (dict(name="cifar10"), DataError),  # needs a directory
    (dict(name="/no/such/path"), DataError),
    (dict(name="digits", split="training"), ConfigError),
    (dict(name="digits", data_ratio=0.0), ConfigError),
    (dict(name="digits", data_ratio=1.5), ConfigError),
    (dict(name="digits", image_size=0), ConfigError),
    (dict(name="digits", seed=-1), ConfigError),
    (dict(name="digits", on_bad_image="ignore"), ConfigError),
    (dict(name="digits", degradation="fog=3"), ConfigError),
    (dict(name="digits", split="val", val_size=0), ConfigError),
    (dict(name="digits", val_size=5000), ConfigError),
])
def test_create_dataset_errors(kwargs, error):
    kwargs = {"split": "train", **kwargs}
    with pytest.raises(error):
        create_dataset(**kwargs)


def test_unrecognized_directory_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="folder:"):
        create_dataset(str(tmp_path), "train")
