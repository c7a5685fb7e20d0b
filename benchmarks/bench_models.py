"""Benchmark the networks on this CPU: parameter counts, forward time per image of every DiDiRN and its twin,
and the cost of an S-step CP prediction as a multiple of one classifier forward pass.

    python benchmarks/bench_models.py            # full run (DiDiRN-18/50 at 224 px; about 25 min on 2 cores)
    python benchmarks/bench_models.py --quick    # DiDiRN-18/50 at 28 px only, fewer repeats
    python benchmarks/bench_models.py --frontier # cost of each conditioned_stages option in twin passes (~10 min)

Settings: torch.set_num_threads(2), inference under torch.no_grad, batch 64, one warm-up pass (on 8 images at
224 px), median of 3 timed passes at 28 px and of 2 at 224 px.
28 px runs use the 'small' stem and K = 10 (an MNIST-like setting); 224 px runs the official 'imagenet' stem
and K = 1000. The CP cost times the real sampler: ``CPSampler.run(model.score, model.encode(x))``, so a
DiDiRN pays S network passes and BackboneDiDiCM one backbone pass plus S head passes; it is divided by the
single forward pass of the twin (DiDiRN) or of the same timm model as a plain classifier (wrapper), measured
in the same run.

``--frontier`` measures what an S-step prediction of each ``conditioned_stages`` option (4, 2, 1, 0), the 'mean'
one-pass read-out and the twin cost per image, in passes of the twin, for a narrow DiDiRN-18 (width 16, the
Fashion-MNIST study's network, 28 px, batch 128) and the full-width one (32 px, batch 64), and writes
``results/bench_frontier.json`` for the study report. See ``bench_frontier``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, also when loaded by path (tests)
from _harness import machine_info, write_results  # noqa: E402

import didicm.models as models
from didicm import evaluation
from didicm.diffusion import CPSampler, LogLinearSchedule, UniformDiffusion

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_models.json"
FRONTIER_OUT = Path(__file__).parent / "results" / "bench_frontier.json"
SETTINGS = {28: dict(stem="small", num_classes=10), 224: dict(stem="imagenet", num_classes=1000)}
STEPS = (1, 4, 8)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(batch: int, size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    c = torch.randint(0, num_classes, (batch,), generator=gen)
    sigma = torch.rand(batch, generator=gen) * 5
    return x, c, sigma


def bench_forward(names: list[str], size: int, batch: int, warmup: int, repeats: int) -> list[dict]:
    """Forward time per image of each DiDiRN (x, c, sigma) and its twin (x) at one input size.

    The DiDiRN and its twin alternate within each repeat so that load from other jobs hits both alike; the
    ratio of the two is the median of the per-repeat ratios. At 224 px, where a pass of a large DiDiRN takes
    minutes on 2 cores, the warm-up runs on 8 images.
    """
    settings = SETTINGS[size]
    x, c, sigma = _inputs(batch, size, settings["num_classes"])
    cut = 8 if size >= 224 else batch
    rows = []
    for name in names:
        didirn = timm.create_model(name, **settings).eval()
        twin = timm.create_model(f"{name}_twin", **settings).eval()
        calls = {name: lambda n=cut, m=didirn: m(x[:n], c[:n], sigma[:n]),
                 f"{name}_twin": lambda n=cut, m=twin: m(x[:n])}
        timings = _time_calls({key: (lambda call=call: call(batch)) for key, call in calls.items()}, warmup,
                              repeats, warm_calls=calls)
        ratio = statistics.median(a / b for a, b in zip(timings[name], timings[f"{name}_twin"], strict=True))
        for variant, model in ((name, didirn), (f"{name}_twin", twin)):
            seconds = statistics.median(timings[variant])
            row = dict(model=variant, size=size, batch=batch, **settings, params=_params(model),
                       ms_per_image=1000 * seconds / batch, ms_per_batch=1000 * seconds)
            if variant == name:
                row["time_vs_twin"] = ratio
            rows.append(row)
            print(f"  {variant:16s} {size:4d} px  {1000 * seconds / batch:8.2f} ms/image"
                  + (f"  ({ratio:.2f} x twin)" if variant == name else ""), flush=True)
        del didirn, twin
    return rows


def _time_calls(calls: dict, warmup: int, repeats: int, warm_calls: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each call per repeat, the calls interleaved within a repeat so that load from other jobs hits
    them alike. ``warm_calls`` (default ``calls``) run ``warmup`` times first."""
    timings = {key: [] for key in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for call in (warm_calls or calls).values():
                call()
        for _ in range(repeats):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                timings[key].append(time.perf_counter() - start)
    return timings


def bench_cp(kind: str, size: int, batch: int, warmup: int, repeats: int) -> dict:
    """S-step CP prediction time / one classifier forward, for 'didirn18' or a 'didicm:<backbone>' wrapper.

    Each repeat times the classifier pass and the S-step runs back to back and the ratio is taken within the
    repeat, so that load from other jobs on the machine affects numerator and denominator alike.
    """
    settings = SETTINGS[size]
    x, _, _ = _inputs(batch, size, settings["num_classes"])
    if kind == "didirn18":
        model = timm.create_model("didirn18", **settings).eval()
        baseline_name, baseline = "didirn18_twin", timm.create_model("didirn18_twin", **settings).eval()
    else:
        backbone = kind.removeprefix(models.BACKBONE_PREFIX)
        model = models.create(kind, settings["num_classes"]).eval()
        baseline_name = backbone
        baseline = timm.create_model(backbone, pretrained=False, num_classes=settings["num_classes"]).eval()
    diffusion = UniformDiffusion(settings["num_classes"], LogLinearSchedule())
    samplers = {steps: CPSampler(diffusion, steps=steps) for steps in STEPS}
    calls = {"one_pass": lambda: baseline(x)}
    for steps, sampler in samplers.items():
        calls[steps] = lambda s=sampler: s.run(model.score, model.encode(x))
    timings = _time_calls(calls, warmup, repeats)
    one_pass = statistics.median(timings["one_pass"])
    row = dict(model=kind, baseline=baseline_name, size=size, batch=batch, **settings,
               baseline_ms_per_image=1000 * one_pass / batch, cp={})
    for steps in STEPS:
        ratios = [t / b for t, b in zip(timings[steps], timings["one_pass"], strict=True)]
        row["cp"][str(steps)] = dict(ms_per_image=1000 * statistics.median(timings[steps]) / batch,
                                     cost_vs_one_forward=statistics.median(ratios))
        print(f"  CP {kind:16s} {size:4d} px  S={steps}: {statistics.median(ratios):6.2f} x one {baseline_name} "
              f"pass", flush=True)
    return row


# ---- --frontier: each conditioned_stages option's S-step cost, in twin passes ---------------------------------
FRONTIER_SETTINGS = {
    # the Fashion-MNIST study's network (configs/study_fashion_mnist.yaml) and the official width
    "narrow_28px": dict(kwargs=dict(width=16, stem="imagenet", in_chans=1), size=28, batch=128, repeats=11),
    "full_32px": dict(kwargs=dict(width=64, stem="imagenet", in_chans=3), size=32, batch=64, repeats=7),
}
FRONTIER_STAGES = (4, 2, 1, 0)
FRONTIER_STEPS = (1, 2, 4, 8)
FRONTIER_CLASSES = 10


def _flops(call) -> int:
    """Multiply-accumulate FLOPs of one call (torch's counter: convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def bench_frontier(name: str, setting: dict, repeats: int, seed: int = 0) -> dict:
    """Seconds per call of every option's S-step prediction and of the twin's forward pass, in one run.

    Each repeat runs every call once in a freshly shuffled order, with the twin pass three times at random
    places; a call's cost in that repeat is its time over the median of the repeat's twin passes, and the
    reported ratio is the median over repeats. Shuffling and per-repeat ratios keep load from other jobs (which
    comes and goes) from favouring the options that happen to run next to the twin. Predictions go through
    ``evaluation.predict``, as ``didicm eval`` does: ``encode`` once, then S ``score`` calls and the sampler.
    """
    kwargs, size, batch = setting["kwargs"], setting["size"], setting["batch"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, kwargs["in_chans"], size, size, generator=gen)
    diffusion = UniformDiffusion(FRONTIER_CLASSES, LogLinearSchedule())
    twin = timm.create_model("didirn18_twin", num_classes=FRONTIER_CLASSES, **kwargs).eval()
    calls, meta = {}, {}
    for stages in FRONTIER_STAGES:
        option = f"conditioned_stages={stages}"
        score_model = timm.create_model("didirn18", num_classes=FRONTIER_CLASSES, conditioned_stages=stages,
                                        **kwargs).eval()
        mean_model = timm.create_model("didirn18", num_classes=FRONTIER_CLASSES, conditioned_stages=stages,
                                       parametrization="mean", **kwargs).eval()
        for steps in FRONTIER_STEPS:
            spec = evaluation.parse_sampler(f"cp:{steps}")
            calls[(option, spec.name)] = lambda m=score_model, s=spec: evaluation.predict(m, x, s, diffusion)
            meta[(option, spec.name)] = dict(conditioned_stages=stages, steps=steps, params=_params(score_model))
        # The 'mean' parametrization reads the posterior out in one pass of the network, at any stage count.
        spec = evaluation.parse_sampler("mean")
        calls[(option, "mean")] = lambda m=mean_model, s=spec: evaluation.predict(m, x, s)
        meta[(option, "mean")] = dict(conditioned_stages=stages, steps=1, params=_params(mean_model))
    twin_call = lambda: torch.softmax(twin(x).float(), dim=1)  # noqa: E731  (what the 'classifier' sampler does)
    calls[("twin", "classifier")] = twin_call
    meta[("twin", "classifier")] = dict(conditioned_stages=None, steps=1, params=_params(twin))

    twin_flops = _flops(twin_call)
    samples = {key: [] for key in calls}
    twin_samples, ratios = [], {key: [] for key in calls}
    order = random.Random(seed)
    with torch.no_grad():
        for call in calls.values():  # warm-up: allocator, kernels, lazy init
            call()
        for _ in range(repeats):
            keys = list(calls) + [("twin", "reference")] * 3
            order.shuffle(keys)
            seconds = {}
            for key in keys:
                start = time.perf_counter()
                (twin_call if key == ("twin", "reference") else calls[key])()
                seconds.setdefault(key, []).append(time.perf_counter() - start)
            reference = statistics.median(seconds[("twin", "reference")])
            twin_samples.append(seconds[("twin", "reference")])
            for key in calls:
                samples[key].append(seconds[key][0])
                ratios[key].append(seconds[key][0] / reference)
    rows = []
    for key, call in calls.items():
        option, sampler = key
        rows.append(dict(setting=name, option=option, sampler=sampler, **meta[key],
                         cost_vs_twin=statistics.median(ratios[key]),
                         cost_vs_twin_iqr=_quartiles(ratios[key]),
                         ms_per_image=1000 * statistics.median(samples[key]) / batch,
                         flops_vs_twin=_flops(call) / twin_flops, ratio_samples=ratios[key], seconds=samples[key]))
    twin_seconds = statistics.median(t for repeat in twin_samples for t in repeat)
    return dict(setting=name, model="didirn18", num_classes=FRONTIER_CLASSES, size=size, batch=batch, **kwargs,
                repeats=repeats, twin_ms_per_image=1000 * twin_seconds / batch, twin_gflops_per_image=twin_flops
                / batch / 1e9, twin_reference_seconds=twin_samples, rows=rows)


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [q[0], q[2]]


def frontier_table(results: list[dict]) -> str:
    """Markdown: one row per option, the S-step CP and 'mean' costs in twin passes, one column block per setting."""
    header = ["option"] + [f"{r['setting']} {col}" for r in results for col in
                           [f"cp:{s}" for s in FRONTIER_STEPS] + ["mean"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    options = [f"conditioned_stages={s}" for s in FRONTIER_STAGES] + ["twin"]
    for option in options:
        cells = [option]
        for result in results:
            by_sampler = {row["sampler"]: row["cost_vs_twin"] for row in result["rows"] if row["option"] == option}
            for col in [f"cp:{s}" for s in FRONTIER_STEPS] + ["mean"]:
                value = by_sampler.get(col, by_sampler.get("classifier") if col == "mean" else None)
                cells.append("" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_frontier(args: argparse.Namespace) -> dict:
    started = time.time()
    settings = {name: FRONTIER_SETTINGS[name] for name in args.settings}
    results = []
    for name, setting in settings.items():
        repeats = args.repeats or setting["repeats"]
        print(f"{name}: didirn18 {setting['kwargs']} at {setting['size']} px, batch {setting['batch']}, "
              f"{repeats} repeats", flush=True)
        results.append(bench_frontier(name, setting, repeats))
    table = frontier_table(results)
    print(table, flush=True)
    result = dict(
        command=" ".join(["python", "benchmarks/bench_models.py", *sys.argv[1:]]),
        machine=machine_info(timm=timm.__version__),
        note=("cost_vs_twin: seconds of one S-step prediction of a batch (evaluation.predict: encode once, S score "
              "calls, the sampler) over one forward pass of the twin (didirn18_twin, same width, softmax), "
              "median over repeats of per-repeat ratios; all ratios from this one run, calls shuffled within each "
              "repeat. flops_vs_twin: the same ratio in convolution/matmul FLOPs (machine-independent). The twin "
              "row is a second measurement of the reference (noise floor). A twin ensemble or TTA of S views costs "
              "S twin passes by construction."),
        settings=dict(steps=list(FRONTIER_STEPS), conditioned_stages=list(FRONTIER_STAGES),
                      num_classes=FRONTIER_CLASSES, threads=torch.get_num_threads(),
                      head_of_conditioned_stages_0="ConditionedMLPHead width 256, depth 2 (the defaults)"),
        results=results, table=table, seconds=round(time.time() - started, 1),
    )
    write_results(args.frontier_out, result, indent=1)
    print(f"wrote {args.frontier_out} ({result['seconds']} s)", flush=True)
    return result


def parameter_table() -> list[dict]:
    """Parameter counts at K = 1000 (ImageNet), with timm's ResNets for comparison."""
    rows = []
    for name in models.DIDIRN_NAMES:
        reference = name.replace("didirn", "resnet")
        rows.append(dict(model=name, params=_params(timm.create_model(name, num_classes=1000)),
                         twin_params=_params(timm.create_model(f"{name}_twin", num_classes=1000)),
                         timm_resnet=reference, timm_resnet_params=_params(timm.create_model(reference))))
    wrapper = models.create("didicm:resnet18", 1000)
    rows.append(dict(model="didicm:resnet18", params=_params(wrapper), head_params=_params(wrapper.head),
                     timm_resnet="resnet18", timm_resnet_params=_params(timm.create_model("resnet18"))))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="DiDiRN-18/50 at 28 px only")
    parser.add_argument("--large", nargs="+", default=["didirn18", "didirn50"],
                        help="DiDiRN sizes to time at 224 px (each with its twin)")
    parser.add_argument("--cp-only", action="store_true",
                        help="re-measure only the CP cost and update it in the existing --out JSON")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--frontier", action="store_true",
                        help="only the S-step cost of each conditioned_stages option in twin passes (--frontier-out)")
    parser.add_argument("--frontier-out", type=Path, default=FRONTIER_OUT)
    parser.add_argument("--settings", nargs="+", default=list(FRONTIER_SETTINGS), choices=list(FRONTIER_SETTINGS),
                        help="--frontier: which network/resolution settings to time")
    parser.add_argument("--repeats", type=int, default=None, help="--frontier: repeats per setting (default 11/7)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.frontier:
        return run_frontier(args)
    small_names = ["didirn18", "didirn50"] if args.quick else list(models.DIDIRN_NAMES)
    large_names = [] if args.quick else [n for n in models.DIDIRN_NAMES if n in args.large]
    warmup_small, repeats_small = 1, 3
    warmup_large, repeats_large = 1, 2
    started = time.time()

    if args.cp_only:
        return _rerun_cp(args, warmup_small, repeats_small, warmup_large, repeats_large)
    print("parameters (K = 1000)", flush=True)
    params = parameter_table()
    for row in params:
        print(f"  {row['model']:16s} {row['params']:>12,d}  (timm {row['timm_resnet']}: "
              f"{row['timm_resnet_params']:,d})", flush=True)
    print(f"forward time, batch {args.batch}", flush=True)
    forward = bench_forward(small_names, 28, args.batch, warmup_small, repeats_small)
    if large_names:
        forward += bench_forward(large_names, 224, args.batch, warmup_large, repeats_large)
    cp = _cp_section(args, warmup_small, repeats_small, warmup_large, repeats_large)

    skipped = [f"{n} (+twin) at 224 px" for n in models.DIDIRN_NAMES if n not in large_names]
    if args.quick:
        skipped += [f"{n} (+twin) at 28 px" for n in models.DIDIRN_NAMES if n not in small_names]
        skipped.append("CP cost of the wrapper at 224 px")
    skipped.append("CP cost of DiDiRN-18 at 224 px (S full passes: the ratio is ~S, as at 28 px)")
    wrapper_cp8 = [row["cp"]["8"]["cost_vs_one_forward"] for row in cp if row["model"].startswith("didicm:")]
    result = dict(
        command=" ".join(["python", "benchmarks/bench_models.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=machine_info(timm=timm.__version__),
        note="Timings are medians on a shared 2-core CPU; other jobs may have run at the same time.",
        settings=dict(batch=args.batch, sizes={str(k): v for k, v in SETTINGS.items()}, cp_steps=list(STEPS),
                      warmup_repeats_28px=[warmup_small, repeats_small],
                      warmup_repeats_224px=[warmup_large, repeats_large]),
        parameters=params, forward=forward, cp_cost=cp, skipped=skipped,
        acceptance=dict(criterion="BackboneDiDiCM 8-step CP <= 1.5 x one forward of the same backbone as a classifier",
                        worst_ratio=max(wrapper_cp8), passed=max(wrapper_cp8) <= 1.5),
        seconds=round(time.time() - started, 1),
    )
    write_results(args.out, result)
    print(f"wrapper 8-step CP: worst {max(wrapper_cp8):.2f} x one pass "
          f"({'pass' if result['acceptance']['passed'] else 'FAIL'}); wrote {args.out}", flush=True)
    return result


def _cp_section(args: argparse.Namespace, warmup_small: int, repeats_small: int, warmup_large: int,
                repeats_large: int) -> list[dict]:
    print("S-step CP cost", flush=True)
    cp = [bench_cp("didirn18", 28, args.batch, warmup_small, repeats_small),
          bench_cp("didicm:resnet18", 28, args.batch, warmup_small, repeats_small)]
    if not args.quick:
        cp.append(bench_cp("didicm:resnet18", 224, args.batch, warmup_large, repeats_large))
    return cp


def _rerun_cp(args: argparse.Namespace, *repeats: int) -> dict:
    """Replace the CP section of an earlier run's JSON, keeping the earlier measurements under 'cp_cost_runs'."""
    result = json.loads(args.out.read_text())
    cp = _cp_section(args, *repeats)
    result.setdefault("cp_cost_runs", []).append(result["cp_cost"])
    result["cp_cost"] = cp
    wrapper_cp8 = [row["cp"]["8"]["cost_vs_one_forward"] for row in cp if row["model"].startswith("didicm:")]
    result["acceptance"].update(worst_ratio=max(wrapper_cp8), passed=max(wrapper_cp8) <= 1.5)
    write_results(args.out, result)
    print(f"wrapper 8-step CP: worst {max(wrapper_cp8):.2f} x one pass; updated {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
