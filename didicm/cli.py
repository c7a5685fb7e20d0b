"""`didicm` command line: train, eval, predict, demo. Thin: parsing and printing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, DidicmError

__all__ = ["main"]

DEMO_CONFIG = {
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"name": "didirn18", "kwargs": {"stem": "small", "width": 16}},
    "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64, "steps": 600, "warmup_steps": 30,
              "clip_grad": None},
    "diffusion": {"t_sampling": "antithetic"},
    "eval": {"sampler": "cp", "steps": 8},
    "checkpoint_every": 100,
}


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
                   help="cp:8, cp:2:max, cp:8:min:official, cl:8x10, mean, classifier, dc:20, dc:20:adaptive "
                        "(repeatable)")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here (default: RUN/eval_<split>.json)")


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
    return parser


def _cmd_train(args) -> int:
    from .config import load_config
    from .training import train

    overrides = list(args.overrides)
    for flag, key in (("model", "model.name"), ("dataset", "data.dataset"), ("root", "data.root"),
                      ("degradation", "data.degradation"), ("on_bad_image", "data.on_bad_image"),
                      ("data_ratio", "data.data_ratio"), ("steps", "optim.steps"), ("seed", "seed"),
                      ("output", "output"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    config = load_config(args.config, overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if not result.metrics:  # a non-zero rank of a multi-process run: rank 0 reports
        return 0
    _print_results(result.metrics.get("val", {}), title=f"validation ({result.run_dir})")
    print(f"model written to {result.run_dir / 'model.safetensors'} "
          f"({result.steps_done} steps, {result.seconds:.1f} s, {result.bad_steps} skipped steps)")
    return 0


def _print_results(results: dict, title: str) -> None:
    from .report import format_table

    rows = [dict(method=name, **{k: v for k, v in m.items() if not isinstance(v, (list, dict))})
            for name, m in results.items()]
    columns = ["method", "top1", "top5", "nll", "ece", "brier", "entropy", "aurc", "evaluations_per_image",
               "images_per_second"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)], title=title))


def _dataset_of(meta: dict, split: str, args=None):
    """The split of the data set a checkpoint was trained on (command-line data options override it)."""
    from .data import create_dataset

    data_cfg = meta["config"]["data"]

    def pick(name: str, default):
        value = getattr(args, name, None) if args is not None else None
        return default if value is None else value

    return create_dataset(pick("dataset", None) or data_cfg["dataset"], split, root=pick("root", data_cfg["root"]),
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
    from .loader import eval_batches
    from .report import write_json
    from .training import default_eval_specs, load_trained_model, resolve_device

    device = resolve_device(args.device)
    model, diffusion, meta = load_trained_model(args.checkpoint, device)
    dataset = _dataset_of(meta, args.split, args)
    if dataset.num_classes != meta["num_classes"]:
        raise DidicmError(f"the checkpoint predicts {meta['num_classes']} classes but {dataset!r} has "
                          f"{dataset.num_classes}; evaluate on the data set the model was trained for")
    specs = [parse_sampler(s) for s in args.sampler] or default_eval_specs(model, meta["config"]["eval"])
    results = evaluate(model, eval_batches(dataset, args.batch_size, device, limit=args.limit), specs, diffusion,
                       seed=args.seed, num_classes=dataset.num_classes)
    title = f"{args.split} ({meta['model_name']}, {len(dataset) if args.limit is None else args.limit} images" + \
        (f", degradation {args.degradation}" if args.degradation else "") + ")"
    _print_results(results, title)
    out = Path(args.json) if args.json else Path(args.checkpoint if Path(args.checkpoint).is_dir()
                                                 else Path(args.checkpoint).parent) / f"eval_{args.split}.json"
    write_json(out, {"checkpoint": str(args.checkpoint), "split": args.split, "model": meta["model_name"],
                     "degradation": args.degradation, "results": results})
    print(f"results written to {out}")
    return 0


def _cmd_predict(args) -> int:
    import torch

    from .data.inputs import load_image_for_model
    from .evaluation import parse_sampler, predict
    from .training import default_eval_specs, load_trained_model, resolve_device

    if args.topk <= 0:
        raise DidicmError(f"--topk must be positive, got {args.topk}")
    device = resolve_device(args.device)
    model, diffusion, meta = load_trained_model(args.checkpoint, device)
    images = torch.stack([load_image_for_model(path, meta) for path in args.images]).to(device)
    spec = parse_sampler(args.sampler) if args.sampler else default_eval_specs(model, meta["config"]["eval"])[0]
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
        if trajectory is None:
            raise DidicmError("--plot needs a CP sampler (e.g. --sampler cp:8): it draws the class distribution "
                              "at each diffusion step")
        from .report import plot_trajectories_grid

        plot_trajectories_grid(images.cpu(), trajectory.cpu().numpy(), classes, None, args.plot)
        print(f"trajectory plot written to {args.plot}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, output=args.output, seed=args.seed, progress=not args.no_progress,
             base=DEMO_CONFIG)
    return 0


def _cmd_study(args) -> int:
    from .study import run_study

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    study = run_study(args.config, progress=not args.no_progress, only=args.only, jobs=args.jobs,
                      aggregate_results=not args.no_aggregate)
    if study is None:
        return 0
    print(f"{len(study['cells'])} cells aggregated; report in {study['config']} -> see the output folder")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo, "study": _cmd_study,
            "probe": _cmd_probe}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DidicmError as error:
        print(f"didicm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"didicm {args.command}: interrupted; completed checkpoints are kept (resume with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
