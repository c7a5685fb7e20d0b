"""Prediction and evaluation: turn a model into class probabilities, and those into metrics.

A *sampler spec* names how probabilities are made: ``cp:8`` (CP, 8 steps), ``cp:8:max`` (label mode),
``cp:8:min:official`` (the official time grid), ``cp:8:exponential`` (steps that stay on the simplex without a
clamp, ``exponential_reverse_step``), ``cl:8x10`` (CL, 8 steps, 10 chains), ``mean`` (one pass of a
'mean'-parametrized model), ``classifier`` (softmax of a plain classifier's logits), ``tta:8`` (a classifier's
softmax averaged over the image and 7 augmented views: the compute-matched control for ``cp:8``), ``dc:20``
(the Diffusion Classifier of a generative 'unet' model: 20 shared draws per class; ``dc:20:adaptive`` screens
every class on every fourth draw and gives the other draws to the likeliest classes only).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from . import peers
from .diffusion import CLSampler, CPSampler, UniformDiffusion
from .diffusion.samplers import CP_MODES, CP_UPDATES, GRIDS
from .errors import ConfigError
from .metrics import MetricAccumulator
from .models.unet import is_generative_model

__all__ = ["SamplerSpec", "parse_sampler", "predict", "evaluate", "collect_probs"]


@dataclass(frozen=True)
class SamplerSpec:
    kind: str  # cp | cl | mean | classifier | tta | dc
    steps: int = 8
    chains: int = 10
    mode: str = "min"
    grid: str = "consistent"
    eps: float = 1e-5
    update: str = "euler"  # CP only: 'euler' (the paper's) or 'exponential'

    @property
    def name(self) -> str:
        if self.kind == "cp":
            suffix = (f":{self.mode}" if self.mode != "min" or self.grid != "consistent" else "") + \
                (f":{self.grid}" if self.grid != "consistent" else "") + \
                (f":{self.update}" if self.update != "euler" else "")
            return f"cp:{self.steps}{suffix}"
        if self.kind == "cl":
            return f"cl:{self.steps}x{self.chains}" + (f":{self.grid}" if self.grid != "consistent" else "")
        if self.kind == "tta":
            return f"tta:{self.steps}"
        if self.kind == "dc":
            return f"dc:{self.steps}" + (":adaptive" if self.mode == "adaptive" else "")
        return self.kind

    @property
    def evaluations_per_image(self) -> int:
        return {"cp": self.steps, "tta": self.steps, "cl": self.steps * self.chains}.get(self.kind, 1)

    def build(self, diffusion: UniformDiffusion):
        if self.kind == "cp":
            return CPSampler(diffusion, steps=self.steps, eps=self.eps, mode=self.mode, grid=self.grid,
                             update=self.update)
        if self.kind == "cl":
            return CLSampler(diffusion, steps=self.steps, eps=self.eps, chains=self.chains, grid=self.grid)
        raise ConfigError(f"sampler {self.name!r} is not a diffusion sampler")


def parse_sampler(text: str, eps: float = 1e-5) -> SamplerSpec:
    """Parse 'cp:8', 'cp:8:max', 'cp:8:min:official', 'cp:8:exponential', 'cl:8x10', 'mean', 'classifier', 'tta:8',
    'dc:20' or 'dc:20:adaptive'. After a CP step count, the options (label mode, time grid, update) may come in any
    order, each at most once."""
    parts = text.strip().lower().split(":")
    kind = parts[0]
    try:
        if kind in ("mean", "classifier") and len(parts) == 1:
            return SamplerSpec(kind, steps=1, eps=eps)
        if kind == "tta" and len(parts) == 2:
            spec = SamplerSpec("tta", steps=int(parts[1]), eps=eps)
        elif kind == "dc" and 2 <= len(parts) <= 3:
            if len(parts) == 3 and parts[2] != "adaptive":
                raise ValueError
            spec = SamplerSpec("dc", steps=int(parts[1]), mode=parts[2] if len(parts) == 3 else "full", eps=eps)
        elif kind == "cp" and 2 <= len(parts) <= 5:
            chosen = {}
            for option in parts[2:]:
                group = next((g for g, names in (("mode", CP_MODES), ("grid", GRIDS), ("update", CP_UPDATES))
                              if option in names), None)
                if group is None or group in chosen:
                    raise ValueError
                chosen[group] = option
            spec = SamplerSpec("cp", steps=int(parts[1]), eps=eps, **chosen)
        elif kind == "cl" and 2 <= len(parts) <= 3:
            steps, _, chains = parts[1].partition("x")
            grid = parts[2] if len(parts) > 2 else "consistent"
            if grid not in GRIDS:
                raise ValueError
            spec = SamplerSpec("cl", steps=int(steps), chains=int(chains or 10), grid=grid, eps=eps)
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"cannot read sampler {text!r}; examples: cp:8, cp:2:max, cp:8:min:official, "
                          "cp:8:exponential, cl:8x10, mean, classifier, tta:8, dc:20, dc:20:adaptive") from None
    if spec.steps <= 0 or spec.chains <= 0:
        raise ConfigError(f"sampler {text!r}: steps and chains must be positive")
    return spec


def _is_diffusion(model) -> bool:
    return hasattr(model, "score") and hasattr(model, "encode")


@torch.no_grad()
def predict(model, images: torch.Tensor, spec: SamplerSpec, diffusion: UniformDiffusion | None = None,
            generator: torch.Generator | None = None, return_trajectory: bool = False, features=None,
            augment=None):
    """Class probabilities [B, K] for a batch (and the CP trajectory [B, S+1, K] / CL chains if asked).

    ``features``: the output of ``model.encode(images)`` if already computed (shared across samplers).
    ``augment``: ``augment(images, generator) -> images``, the random views of 'tta' (e.g. the data set's
    ``batch_augment()``).
    """
    if is_generative_model(model) != (spec.kind == "dc"):
        raise ConfigError("sampler 'dc:N' (the Diffusion Classifier) is for the generative 'unet' model, which has "
                          "no other sampler" if spec.kind == "dc" else
                          f"this is a generative 'unet' model: use --sampler dc:N (e.g. dc:20), not {spec.name!r}")
    if spec.kind == "dc":
        if not bool(model.error_scale_fitted):
            warnings.warn("this generative model's error scale was never fit (a mid-training checkpoint?): dc "
                          "probabilities are near-uniform, so NLL/ECE/Brier mean little; top-1 is unaffected. Use the "
                          "final model.safetensors or didicm.peers.calibrate_error_scale", stacklevel=2)
        errors, _ = peers.classify(model, images, spec.steps, generator, adaptive=spec.mode == "adaptive")
        probs = peers.probabilities(errors, model.error_scale)
        return (probs, probs[:, None]) if return_trajectory else probs
    if spec.kind == "tta":
        if _is_diffusion(model) or augment is None:
            raise ConfigError("sampler 'tta:S' needs a plain classifier and an augmentation for the extra views")
        views = [images] + [augment(images, generator) for _ in range(spec.steps - 1)]
        probs = torch.stack([torch.softmax(model(view).float(), dim=1) for view in views]).mean(dim=0)
        return (probs, probs[:, None]) if return_trajectory else probs
    if spec.kind == "classifier":
        if _is_diffusion(model):
            raise ConfigError("sampler 'classifier' is for plain classifiers; use cp:S, cl:SxN or mean for DiDiCM")
        probs = torch.softmax(model(images).float(), dim=1)
        return (probs, probs[:, None]) if return_trajectory else probs
    if not _is_diffusion(model):
        raise ConfigError(f"sampler {spec.name!r} needs a DiDiCM model; this model is a plain classifier "
                          "(use --sampler classifier)")
    if spec.kind == "mean":
        if getattr(model, "parametrization", "score") != "mean":
            raise ConfigError("sampler 'mean' needs a model trained with parametrization 'mean'")
        probs = torch.softmax(model.clean_logits(images).float(), dim=1)
        return (probs, probs[:, None]) if return_trajectory else probs
    if diffusion is None:
        raise ConfigError(f"sampler {spec.name!r} needs the diffusion (schedule) the model was trained with")
    z = model.encode(images) if features is None else features
    return spec.build(diffusion).run(model.score, z, generator=generator, return_trajectory=return_trajectory)


@torch.no_grad()
def evaluate(model, batches, specs: list[SamplerSpec], diffusion: UniformDiffusion | None = None,
             seed: int = 0, num_classes: int | None = None, augment=None,
             progress: int | bool | None = None) -> dict[str, dict]:
    """Metrics for each sampler on the same images, encoding each batch once.

    ``progress``: show a bar over the images with each sampler's images/s (an int is the number of images
    expected; True: unknown); None/False: silent.

    Returns {spec name: {top1, top5, nll, ece, brier, entropy, aurc, images_per_second,
    evaluations_per_image, seconds, count, [step_top1 for CP: top-1 after each step of the one run]}}.
    """
    model.eval()
    accumulators = {spec.name: MetricAccumulator() for spec in specs}
    seconds = {spec.name: 0.0 for spec in specs}
    step_correct = {spec.name: None for spec in specs}
    count = 0
    generator = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=None if progress is True else int(progress), unit="img", dynamic_ncols=True, leave=False,
                   desc="eval " + ", ".join(spec.name for spec in specs))
    for images, labels in batches:
        device = images.device
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)
        started = time.perf_counter()
        features = model.encode(images) if _is_diffusion(model) and any(s.kind in ("cp", "cl") for s in specs) \
            else None
        encode_time = time.perf_counter() - started
        for spec in specs:
            started = time.perf_counter()
            want_steps = spec.kind == "cp"
            out = predict(model, images, spec, diffusion, generator, return_trajectory=want_steps,
                          features=features, augment=augment)
            probs, trajectory = out if want_steps else (out, None)
            seconds[spec.name] += time.perf_counter() - started + (encode_time if features is not None else 0.0)
            if num_classes is not None and probs.shape[1] != num_classes:
                raise ConfigError(f"model predicts {probs.shape[1]} classes but the data set has {num_classes}")
            accumulators[spec.name].update(probs.cpu(), labels.cpu())
            if trajectory is not None:
                correct = (trajectory.argmax(dim=2) == labels[:, None]).sum(dim=0).cpu()
                previous = step_correct[spec.name]
                step_correct[spec.name] = correct if previous is None else previous + correct
        count += labels.shape[0]
        if bar is not None:
            bar.update(labels.shape[0])
            bar.set_postfix_str(", ".join(f"{name} {count / max(t, 1e-9):.1f} img/s" for name, t in seconds.items()))
    if bar is not None:
        bar.close()
    results = {}
    for spec in specs:
        metrics = accumulators[spec.name].compute()
        evaluations = spec.evaluations_per_image
        if spec.kind == "dc":
            evaluations = peers.evaluations_per_image(model.num_classes, spec.steps, spec.mode == "adaptive")
        metrics.update(images_per_second=count / max(seconds[spec.name], 1e-9), seconds=seconds[spec.name],
                       evaluations_per_image=evaluations, count=count, sampler=spec.name)
        if step_correct[spec.name] is not None:
            metrics["step_top1"] = (100.0 * step_correct[spec.name].double() / count).tolist()
        results[spec.name] = metrics
    return results


@torch.no_grad()
def collect_probs(model, batches, spec: SamplerSpec, diffusion: UniformDiffusion | None = None, seed: int = 0,
                  augment=None, return_trajectory: bool = False):
    """(probs [N, K] float32 CPU, labels [N] int64 CPU[, trajectories [N, S+1, K] float32 CPU]) of one sampler
    over all batches, with one generator seeded by ``seed`` (the same draws as ``evaluate`` with this spec)."""
    model.eval()
    chunks, labels, trajectories, generator = [], [], [], None
    for images, targets in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        out = predict(model, images, spec, diffusion, generator, return_trajectory=return_trajectory,
                      augment=augment)
        probs, trajectory = out if return_trajectory else (out, None)
        chunks.append(probs.float().cpu())
        labels.append(targets.cpu())
        if trajectory is not None:
            trajectories.append(trajectory.float().cpu())
    if not chunks:
        raise ConfigError("collect_probs got no batches: the split is empty")
    result = (torch.cat(chunks), torch.cat(labels))
    return (*result, torch.cat(trajectories)) if return_trajectory else result
