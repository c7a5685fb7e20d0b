"""The ImageNet recipes' components against timm's (transforms, repeated augmentation, schedules, mixup), the
scalable data path (compact file list, lazy resumable stream, sharded evaluation) and the recipe configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from didicm.config import load_config
from didicm.data import FileList, create_dataset, official_ratio_subset
from didicm.errors import ConfigError
from didicm.loader import TrainStream, eval_batches, repeated_epoch_length, seed_all

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("imagenet_*.yaml"))
STRONG_TRANSFORM = dict(auto_augment="rand-m7-mstd0.5-inc1", train_interpolation="random", interpolation="bicubic")


def make_jpegs(root: Path, classes: int = 3, train: int = 8, val: int = 2, size=(40, 52)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpegs(tmp_path_factory.mktemp("jpegs"))


def test_recipe_configs_load_and_carry_the_official_values():
    assert {p.stem for p in RECIPES} == {f"imagenet_{m}_{r}" for m in ("didirn50", "didirn50_twin", "resnet50")
                                        for r in ("strong", "weak")}
    for path in RECIPES:
        cfg = load_config(path, ["data.image_size=64", "data.data_ratio=0.1"])
        strong = "strong" in path.stem
        o, d = cfg.optim, cfg.data
        assert (o.opt, o.weight_decay, o.epochs, o.warmup_epochs, o.sched, o.amp_dtype) == \
            ("lamb", 0.01, 600, 5, "cosine", "float16")
        assert (o.lr, o.batch_size_per_gpu) == ((3.5e-3, 256) if strong else (2e-3, 128))
        assert (o.mixup, o.cutmix, d.aug_repeats) == ((0.2, 1.0, 3) if strong else (0.0, 0.0, 0))
        assert d.transform.get("auto_augment") == ("rand-m7-mstd0.5-inc1" if strong else None)
        assert o.lr_ratio_scale == ("none" if strong else "sqrt")
        assert (d.val_size, d.eval_split, d.ratio_rule, d.augment, d.image_size) == (0, "test", "official", True, 64)
        assert cfg.model.init == ("default" if "resnet50" in path.stem else "torch")


def test_transform_pipeline_is_timms_and_reproducible_per_seed(jpegs):
    from timm.data import create_transform

    ds = create_dataset(f"folder:{jpegs}", "train", image_size=32, augment=True, val_size=0,
                        transform=STRONG_TRANSFORM)
    reference = create_transform((3, 32, 32), is_training=True, use_prefetcher=True,
                                 auto_augment="rand-m7-mstd0.5-inc1", interpolation="random")
    assert repr(ds._train_transform) == repr(reference)
    path, label = ds.samples[5]
    seed_all(123)
    mine = ds.pixels(5)
    seed_all(123)
    theirs = reference(Image.open(path).convert("RGB"))
    assert mine[1] == label and mine[0].dtype == torch.uint8 and torch.equal(mine[0], theirs)
    seed_all(123)
    assert torch.equal(ds.pixels(5)[0], mine[0])  # every draw (Python, numpy, torch) follows the seed
    evaluation = create_dataset(f"folder:{jpegs}", "test", image_size=32, transform=STRONG_TRANSFORM)
    eval_reference = create_transform((3, 32, 32), is_training=False, use_prefetcher=True, crop_pct=0.875,
                                      interpolation="bicubic")
    assert repr(evaluation._eval_transform) == repr(eval_reference)


def test_repeated_augmentation_matches_timms_repeat_aug_sampler():
    from timm.data.distributed_sampler import RepeatAugSampler

    size, world, batch = 600, 2, 64
    data = torch.zeros(size)
    for rank in range(world):
        stream = TrainStream(data, batch, seed=0, rank=rank, world=world, repeats=3)
        # the same epoch permutation as timm's (which seeds with the epoch alone)
        stream._perms[0] = torch.randperm(size, generator=torch.Generator().manual_seed(0)).numpy()
        steps = stream.epoch_length // batch
        mine = [i for step in range(steps) for i, _ in stream.indices(step)]
        sampler = RepeatAugSampler(data, num_replicas=world, rank=rank, num_repeats=3)
        sampler.set_epoch(0)
        assert mine == list(sampler)
    assert repeated_epoch_length(600, 3) == 512 and repeated_epoch_length(100, 3) == 100
    assert repeated_epoch_length(600, 0) == 600


def test_stream_is_lazy_and_resumes_bit_for_bit_with_workers(jpegs):
    ds = create_dataset(f"folder:{jpegs}", "train", image_size=16, augment=True, val_size=0,
                        transform=STRONG_TRANSFORM)
    whole = [x for x, _ in TrainStream(ds, 6, seed=3, num_workers=2, repeats=3).batches(0, 5)]
    resumed = [x for x, _ in TrainStream(ds, 6, seed=3, num_workers=0, repeats=3).batches(3, 5)]
    assert whole[0].dtype == torch.float32 and whole[0].shape == (6, 3, 16, 16)
    for a, b in zip(whole[3:], resumed, strict=True):
        assert torch.equal(a, b)
    # a 600-epoch ImageNet budget costs nothing up front: indices are drawn per step
    big = TrainStream(torch.zeros(1_281_167), 2048, seed=0, rank=3, world=8, repeats=3)
    assert len(big.indices(375_000)) == 256 and len(big._perms) == 1


def test_device_normalisation_equals_the_datasets(jpegs):
    ds = create_dataset(f"folder:{jpegs}", "test", image_size=16)
    images, labels = next(iter(eval_batches(ds, 4, num_workers=0)))
    expected = torch.stack([ds[i][0] for i in range(4)])
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == [int(ds.targets[i]) for i in range(4)]


def test_evaluation_shards_cover_the_set_once(jpegs):
    ds = create_dataset(f"folder:{jpegs}", "test", image_size=16)
    whole = torch.cat([x for x, _ in eval_batches(ds, 4)])
    shards = [torch.cat([x for x, _ in eval_batches(ds, 4, rank=r, world=4, num_workers=1)]) for r in range(4)]
    torch.testing.assert_close(torch.cat(shards), whole)


def test_file_list_is_compact_and_in_timms_natural_order(tmp_path):
    for name in ("img10.JPEG", "img9.JPEG", "img100.JPEG", "notes.txt"):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / name).write_bytes(b"")
    from didicm.data.folder import list_folder

    files = list_folder(tmp_path / "train", ["a"])
    assert [p.name for p, _ in files] == ["img9.JPEG", "img10.JPEG", "img100.JPEG"]
    names = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(10) for i in range(100)]
    compact = FileList(Path("/x"), names, np.repeat(np.arange(10), 100))
    assert compact.nbytes < 40 * len(names) and compact[123] == (Path("/x") / names[123], 1)
    sub = compact.subset(np.array([999, 0, 500]))
    assert [str(p) for p, _ in sub] == [f"/x/{names[i]}" for i in (999, 0, 500)]


def test_official_data_ratio_rule():
    labels = np.repeat(np.arange(3), [10, 7, 1])
    kept = official_ratio_subset(labels, 0.5)
    expected = []
    start = 0
    for n in (10, 7, 1):  # the rule as the official code states it: one generator seeded 42 per class
        order = torch.randperm(n, generator=torch.Generator().manual_seed(42))[:math.floor(n * 0.5)]
        expected += [start + int(i) for i in order]
        start += n
    assert kept.tolist() == sorted(expected)
    assert (labels[kept] == 2).sum() == 0  # floor(1 * 0.5) = 0: a class can vanish, as officially


def test_bad_recipe_values_are_named():
    with pytest.raises(ConfigError, match="data.eval_split"):
        load_config(None, ["data.eval_split=train"])
    with pytest.raises(ConfigError, match="optim.amp_dtype"):
        load_config(None, ["optim.amp_dtype=float8"])
    with pytest.raises(ConfigError, match="data.aug_repeats"):
        load_config(None, ["data.aug_repeats=-1"])
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["model.init=xavier"])
    with pytest.raises(ConfigError, match="eval.update"):
        load_config(None, ["eval.update=rk4"])
    assert load_config(None, ["eval.update=exponential"]).eval.update == "exponential"


def _lrs(schedule, optimizer, steps: int) -> list[float]:
    out = []
    for step in range(steps):
        schedule(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("on_updates", [False, True])
def test_lr_schedule_per_step_equals_timms(on_updates):
    from timm.scheduler import create_scheduler_v2

    from didicm.training.one_step import LrSchedule

    cfg = load_config(RECIPES[0], [f"optim.sched_on_updates={str(on_updates).lower()}", "optim.epochs=12",
                                   "optim.warmup_epochs=3"])
    steps_per_epoch, epochs = 7, 12
    mine_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    mine = LrSchedule(mine_opt, cfg, steps_per_epoch, epochs * steps_per_epoch, 3 * steps_per_epoch, cfg.optim.lr)
    # timm's train.py: the scheduler made from the flags, stepped per epoch (or per update with --sched-on-updates)
    timm_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    theirs, _ = create_scheduler_v2(timm_opt, sched="cosine", num_epochs=epochs, warmup_epochs=3, warmup_lr=1e-5,
                                    min_lr=0.0, step_on_epochs=not on_updates, updates_per_epoch=steps_per_epoch)

    def timm_step(step: int) -> None:
        if on_updates:
            theirs.step_update(step)
        elif step % steps_per_epoch == 0:
            theirs.step(step // steps_per_epoch)

    assert _lrs(mine.step, mine_opt, epochs * steps_per_epoch) == \
        _lrs(timm_step, timm_opt, epochs * steps_per_epoch)


def test_torch_init_undoes_didicms_init():
    from didicm.runtime import apply_init, build_model

    torch.manual_seed(0)
    model = apply_init(build_model("didirn18", 10, 3, {"zero_init_head": False, "stem": "small", "width": 16}),
                       "torch")
    assert model.fc.weight.abs().sum() > 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):  # PyTorch's kaiming_uniform(a=sqrt(5)): |w| <= 1 / sqrt(fan_in)
            fan_in = module.weight[0].numel()
            assert module.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
