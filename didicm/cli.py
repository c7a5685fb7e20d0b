"""`didicm` command line: train, eval, predict, demo. Thin: parsing and printing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .config import merge_dicts
from .errors import ConfigError, DidicmError
from .recipes import SMALL_IMAGE_RECIPE

# Heavy modules (torch, timm, matplotlib) are imported inside the commands that use them: `didicm --help`
# answers in a tenth of a second instead of five.

__all__ = ["main"]

# the demo is the small-image recipe that `didicm train` picks for small images, on the embedded digits
DEMO_CONFIG = merge_dicts({
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"name": "didirn18"},
    "optim": {"clip_grad": None},
    "eval": {"sampler": "cp", "steps": 8},
    "checkpoint_every": 100,
}, SMALL_IMAGE_RECIPE)


def _add_data_args(parser: argparse.ArgumentParser, with_defaults: bool = False) -> None:
    parser.add_argument("--dataset", help="digits, fashion-mnist, idx:DIR, cifar10:DIR, cifar100:DIR, folder:DIR")
    parser.add_argument("--root", help="where the data set lives (for names that have a default location)")
    parser.add_argument("--degradation", help='e.g. "resolution=7" or "noise=0.1,blur=1.0,jpeg=30"')
    parser.add_argument("--on-bad-image", choices=["fail", "skip"], help="corrupt files in folder data sets")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train DiDiCM or a cross-entropy classifier from a YAML config")
    p.add_argument("--config", help="YAML file (sections data, model, diffusion, optim, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--model", help="didirn18, didirn18_twin, didicm:resnet18, or any timm classifier")
    _add_data_args(p)
    p.add_argument("--data-ratio", type=float, help="per-class fraction of the training set, in (0, 1]")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="run folder (checkpoints, log.csv, model.safetensors)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--no-progress", action="store_true")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model: accuracy, NLL, ECE, Brier, ...")
    p.add_argument("checkpoint", help="run folder or model.safetensors")
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--sampler", action="append", default=[],
                   help="cp:8, cp:2:max, cp:8:min:official, cp:8:exponential, cl:8x10, mean, classifier, tta:8 (a "
                        "classifier over 8 augmented views), dc:20, dc:20:adaptive (repeatable)")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here (default: RUN/eval_<split>.json)")
    p.add_argument("--no-progress", action="store_true")
    _add_official_args(p)


def _add_official_args(p: argparse.ArgumentParser) -> None:
    """Flags for what an official checkpoint (model_best.pth.tar) does not record; official defaults."""
    p.add_argument("--ema", action="store_true", help="use the EMA weights (an official file's state_dict_ema)")
    p.add_argument("--mean", type=float, nargs="+", help="input mean per channel, official files only "
                                                        "(default: the file's args.mean, else ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", help="input std per channel, official files only "
                                                       "(default: the file's args.std, else ImageNet's)")
    p.add_argument("--class-names", help="class names: a text file (one per line) or a comma-separated list "
                                         "(default: the run's names; 0..K-1 for official files)")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a didicm model as an official checkpoint (for the official validate.py)")
    p.add_argument("source", help="run folder or checkpoint (.safetensors)")
    p.add_argument("output", help="the .pth.tar file to write")
    p.add_argument("--ema", action="store_true", help="require the EMA weights (a run trained with optim.ema_decay)")


def _probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="linear probe on a generative 'unet' model's features (block and t chosen "
                                     "on validation), evaluated on the test split")
    p.add_argument("checkpoint", help="run folder or model.safetensors of a model trained with model.name=unet")
    p.add_argument("--times", type=int, nargs="+", default=[25, 100, 250], help="candidate noise levels t")
    p.add_argument("--blocks", nargs="+", help="candidate blocks (default: all: down0.., mid, up0..)")
    p.add_argument("--train-limit", type=int, help="fit on the first N training images only")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here (default: RUN/probe.json)")


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--sampler", default=None, help="default: the one the model was trained to use")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--plot", help="PNG of the class distribution over the diffusion steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_official_args(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train DiDiCM and its twin on the embedded digits set and compare them")
    p.add_argument("--steps", type=int, default=DEMO_CONFIG["optim"]["steps"])
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _study_parser(sub) -> None:
    p = sub.add_parser("study", help="DiDiCM vs its twin over a grid of resolutions and data ratios (resumable)")
    p.add_argument("config", help="study YAML, e.g. configs/study_fashion_mnist.yaml")
    p.add_argument("--only", action="append", help="run only this cell, e.g. res7_ratio0.02_seed0 (repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run in parallel worker processes (helps a GPU, whose small kernels leave it idle)")
    p.add_argument("--no-aggregate", action="store_true", help="run cells only; skip study.json and the report")
    p.add_argument("--status", action="store_true",
                   help="print which arms are done, training (epoch, best validation, patience left), stopped "
                        "(resume from a checkpoint) or pending, then exit; reads files only")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="didicm", description="Discrete Diffusion Classification Modeling")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _demo_parser(sub)
    _study_parser(sub)
    _probe_parser(sub)
    _export_parser(sub)
    return parser


def _cmd_train(args) -> int:
    from .config import DataConfig, config_from_dict, load_values
    from .data import dataset_info
    from .recipes import SMALL_IMAGE_SIZE, fit_to_data
    from .training import train

    overrides = list(args.overrides)
    for flag, key in (("model", "model.name"), ("dataset", "data.dataset"), ("root", "data.root"),
                      ("degradation", "data.degradation"), ("on_bad_image", "data.on_bad_image"),
                      ("data_ratio", "data.data_ratio"), ("steps", "optim.steps"), ("seed", "seed"),
                      ("output", "output"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    values = load_values(args.config, overrides)
    data = values.get("data") or {}
    size = data.get("image_size") or \
        dataset_info(data.get("dataset", DataConfig.dataset), data.get("root"))["image_size"]
    values, filled = fit_to_data(values, size)
    if filled:
        print(f"{size} px images (<= {SMALL_IMAGE_SIZE}): the small-image recipe sets "
              + ", ".join(f"{key}={_lookup(values, key)}" for key in filled) + " (set any of them to override)")
    config = config_from_dict(values)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if not result.metrics:  # a non-zero rank of a multi-process run: rank 0 reports
        return 0
    _print_results(result.metrics.get("val", {}), title=f"validation ({result.run_dir})")
    print(f"model written to {result.run_dir / 'model.safetensors'} "
          f"({result.steps_done} steps, {result.seconds:.1f} s, {result.bad_steps} skipped steps)")
    return 0


def _lookup(values: dict, dotted: str):
    for key in dotted.split("."):
        values = values[key]
    return values


def _print_results(results: dict, title: str) -> None:
    from .report import format_table

    rows = [dict(method=name, **{k: v for k, v in m.items() if not isinstance(v, (list, dict))})
            for name, m in results.items()]
    columns = ["method", "top1", "top5", "nll", "ece", "brier", "entropy", "aurc", "evaluations_per_image",
               "images_per_second"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)], title=title))


def _dataset_of(meta: dict, split: str, args=None):
    """The split of the data set a checkpoint was trained on (command-line data options override it)."""
    from .data import create_dataset, resolve_source
    from .data.inputs import folder_transform_of, preprocess_of

    data_cfg = meta["config"]["data"]

    def pick(name: str, default):
        value = getattr(args, name, None) if args is not None else None
        return default if value is None else value

    name, root = pick("dataset", None) or data_cfg["dataset"], pick("root", data_cfg["root"])
    # a folder's files are prepared as `predict` prepares them (the run's crop, or an official file's)
    extra = {}
    if name and resolve_source(name, root).kind == "folder":
        extra["transform"] = folder_transform_of(preprocess_of(meta))
    return create_dataset(name, split, root=root, **extra,
                          image_size=meta.get("image_size") or data_cfg["image_size"],
                          degradation=pick("degradation", data_cfg["degradation"]),
                          val_size=data_cfg["val_size"], seed=data_cfg["split_seed"],
                          # the training split is the subset the model was trained on (its data ratio)
                          data_ratio=data_cfg.get("data_ratio", 1.0) if split == "train" else 1.0,
                          on_bad_image=pick("on_bad_image", None) or data_cfg["on_bad_image"])


def _cmd_probe(args) -> int:
    from . import peers
    from .errors import CheckpointError
    from .evaluation import evaluate, parse_sampler
    from .loader import eval_batches
    from .report import write_json
    from .training import load_trained_model, resolve_device

    device = resolve_device(args.device)
    model, _, meta = load_trained_model(args.checkpoint, device)
    if meta.get("method") != "generative":
        raise CheckpointError(f"{args.checkpoint} holds a {meta.get('method', 'unknown')!r} model "
                              f"({meta.get('model_name')}); the feature probe needs a generative model "
                              "(didicm train --set model.name=unet)")
    train_set, val_set, test_set = (_dataset_of(meta, split) for split in ("train", "val", "test"))
    probe, rows = peers.fit_feature_probe(
        model, lambda: eval_batches(train_set, args.batch_size, device, limit=args.train_limit),
        lambda: eval_batches(val_set, args.batch_size, device), args.times, args.blocks, seed=args.seed)
    results = evaluate(probe, eval_batches(test_set, args.batch_size, device), [parse_sampler("classifier")],
                       seed=args.seed, num_classes=test_set.num_classes)
    for row in rows:
        print(f"  block {row['block']:>6}  t {row['t']:>4}  val top-1 {row['val_top1']:.2f}")
    _print_results(results, f"test, linear probe on block {probe.block} at t={probe.t}")
    out = Path(args.json) if args.json else Path(args.checkpoint if Path(args.checkpoint).is_dir()
                                                 else Path(args.checkpoint).parent) / "probe.json"
    train_images = len(train_set) if args.train_limit is None else min(args.train_limit, len(train_set))
    write_json(out, {"checkpoint": str(args.checkpoint), "block": probe.block, "t": probe.t, "candidates": rows,
                     "train_images": train_images, "test": results["classifier"]})
    print(f"results written to {out}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import evaluate, parse_sampler
    from .interop import match_normalization
    from .loader import eval_batches
    from .report import write_json
    from .training import default_eval_specs, resolve_device

    device = resolve_device(args.device)
    model, diffusion, meta = _load_model(args, device)
    if meta["config"]["data"]["dataset"] is None and args.dataset is None:
        raise DidicmError(f"{args.checkpoint} does not record its data set (an official checkpoint): pass "
                          "--dataset, e.g. folder:/data/imagenet")
    dataset = _dataset_of(meta, args.split, args)
    _check_same_data(meta, dataset)
    specs = [parse_sampler(s) for s in args.sampler] or default_eval_specs(model, meta["config"]["eval"])
    # tta:S draws its extra views with the data set's own train augmentation
    augment = dataset.batch_augment() if any(spec.kind == "tta" for spec in specs) else None
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    # the data set normalizes with its own statistics; an official model expects those it was trained with
    batches = match_normalization(eval_batches(dataset, args.batch_size, device, limit=args.limit), dataset.mean,
                                  dataset.std, meta["mean"], meta["std"])
    results = evaluate(model, batches, specs, diffusion,
                       seed=args.seed, num_classes=dataset.num_classes, augment=augment,
                       progress=None if args.no_progress else total)
    title = f"{args.split} ({meta['model_name']}, {len(dataset) if args.limit is None else args.limit} images" + \
        (f", degradation {args.degradation}" if args.degradation else "") + ")"
    _print_results(results, title)
    out = Path(args.json) if args.json else Path(args.checkpoint if Path(args.checkpoint).is_dir()
                                                 else Path(args.checkpoint).parent) / f"eval_{args.split}.json"
    write_json(out, {"checkpoint": str(args.checkpoint), "split": args.split, "model": meta["model_name"],
                     "degradation": args.degradation, "results": results})
    print(f"results written to {out}")
    return 0


def _check_same_data(meta: dict, dataset) -> None:
    """Refuse a data set unlike the checkpoint's (channels or classes), naming both data sets."""
    trained = meta["config"]["data"]["dataset"]
    if dataset.in_chans != meta["in_chans"] or dataset.num_classes != meta["num_classes"]:
        def describe(chans, classes):
            kind = {1: "grey", 3: "RGB"}.get(chans, f"{chans}-channel")
            return f"{classes} classes of {kind} images"
        raise DidicmError(f"mismatched data set: the checkpoint was trained on {trained} "
                          f"({describe(meta['in_chans'], meta['num_classes'])}) but {dataset.name} has "
                          f"{describe(dataset.in_chans, dataset.num_classes)}; evaluate it on {trained} "
                          "(drop --dataset) or on a data set like it")


def _cmd_predict(args) -> int:
    import torch

    from .data.inputs import image_loader_for_model
    from .evaluation import parse_sampler, predict
    from .training import default_eval_specs, resolve_device

    if args.topk <= 0:
        raise DidicmError(f"--topk must be positive, got {args.topk}")
    device = resolve_device(args.device)
    model, diffusion, meta = _load_model(args, device)
    load = image_loader_for_model(meta)
    images = torch.stack([load(path) for path in args.images]).to(device)
    spec = parse_sampler(args.sampler) if args.sampler else default_eval_specs(model, meta["config"]["eval"])[0]
    if args.plot and spec.kind != "cp":  # refused before any work is printed
        raise DidicmError(f"--plot draws the class distribution over CP's diffusion steps; sampler {spec.name} has no "
                          "steps (for a classifier or twin, drop --plot; for DiDiCM, use --sampler cp:8)")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    want_trajectory = spec.kind == "cp"
    out = predict(model, images, spec, diffusion, generator, return_trajectory=want_trajectory)
    probs, trajectory = out if want_trajectory else (out, None)
    classes = meta["classes"]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    k = min(args.topk, probs.shape[1])
    for path, row, h in zip(args.images, probs, entropy, strict=True):
        values, indices = row.topk(k)
        ranked = ", ".join(f"{classes[i]} {v:.3f}" for v, i in zip(values.tolist(), indices.tolist(), strict=True))
        print(f"{path}: {ranked}  (entropy {h.item():.3f} nats, sampler {spec.name})")
    if args.plot:
        from .report import plot_trajectories_grid

        plot_trajectories_grid(images.cpu(), trajectory.cpu().numpy(), classes, None, args.plot)
        print(f"trajectory plot written to {args.plot}")
    return 0


def _load_model(args, device):
    """(model, diffusion, meta) of a didicm run or an official checkpoint, with the official-file flags applied."""
    from .interop import load_model, set_class_names, set_normalization

    model, diffusion, meta = load_model(args.checkpoint, device, ema=args.ema, channels_last=None)  # as trained
    if meta["format"] != "official" and (args.mean or args.std):
        raise DidicmError("--mean/--std are for official checkpoints; a didicm run records its own normalization")
    return model, diffusion, set_class_names(set_normalization(meta, args.mean, args.std), args.class_names)


def _cmd_export(args) -> int:
    from .interop import export_official

    out = export_official(args.source, args.output, ema=args.ema)
    print(f"official checkpoint written to {out} (validate.py: --checkpoint {out} --model <arch> --num-classes K)")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, output=args.output, seed=args.seed, progress=not args.no_progress,
             base=DEMO_CONFIG)
    return 0


def _cmd_study(args) -> int:
    from .study import run_study

    if args.status:
        from .study.status import format_status, study_status

        print(format_status(study_status(args.config)))
        return 0
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    study = run_study(args.config, progress=not args.no_progress, only=args.only, jobs=args.jobs,
                      aggregate_results=not args.no_aggregate)
    if study is None:
        return 0
    from .study import load_study

    print(f"{len(study['cells'])} cells aggregated; report written to "
          f"{Path(load_study(args.config)['output']) / 'report.md'}")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo, "study": _cmd_study,
            "probe": _cmd_probe, "export": _cmd_export}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"didicm: warning: {message}\n"  # no source line: the user did not write it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that training's cleanup (its run-folder lock, a study's workers) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    # the default SIGTERM action ends the process without unwinding, leaving locks behind (`kill`, job schedulers).
    # Not under torchrun with several processes: a rank blocked in a collective cannot unwind, and torchrun's own
    # SIGTERM-then-SIGKILL shutdown of the group should stay immediate
    catch = (threading.current_thread() is threading.main_thread()
             and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if catch else None
    try:
        return COMMANDS[args.command](args)
    except DidicmError as error:
        print(f"didicm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        how, code = ("terminated", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        print(f"didicm {args.command}: {how}; completed checkpoints are kept (resume with --resume)",
              file=sys.stderr)
        return code
    finally:
        if catch and previous is not None:  # None: a handler installed outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
