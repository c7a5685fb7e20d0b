"""Tables, JSON results and figures for ``didicm eval`` and the uncertainty study.

Tables: ``format_table`` (aligned plain text) and ``markdown_table``. Results: ``write_json`` (atomic, tensors
and numpy values converted to plain Python). Figures (PNG, drawn on ``matplotlib.figure.Figure`` with the Agg
renderer, so no display and no pyplot global state): reliability diagrams, accuracy against the number of
sampler steps, the class distribution along the reverse diffusion, and the DiDiCM - twin gap against the
uncertainty level. Every figure function returns the path it wrote; the PNG is ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .errors import InputError
from .files import atomic_write_bytes

__all__ = [
    "format_table", "markdown_table", "format_number", "to_plain", "write_json", "plot_reliability",
    "plot_accuracy_vs_steps", "plot_trajectory", "plot_trajectories_grid", "plot_gap",
]

MISSING = "-"


# ---- plain values ------------------------------------------------------------------------------------------------
def to_plain(obj):
    """Converts ``obj`` to JSON-ready Python: dicts, lists, str, int, float, bool and None.

    Tensors and numpy arrays become (nested) lists, 0-d ones and numpy scalars become numbers, tuples and sets
    lists, paths strings, dataclasses dicts, non-string keys strings. NaN and +-Inf become None, because strict
    JSON has no spelling for them.

    Raises:
        InputError: for a value of any other type (the message names it).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return to_plain(obj.item() if obj.ndim == 0 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return to_plain(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {_plain_key(key): to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [to_plain(value) for value in sorted(obj, key=repr)]
    if isinstance(obj, (list, tuple)):
        return [to_plain(value) for value in obj]
    raise InputError(f"cannot convert a {type(obj).__name__} to JSON; pass numbers, strings, lists, dicts, "
                     f"tensors or numpy arrays")


def _plain_key(key) -> str:
    plain = to_plain(key)
    if isinstance(plain, (dict, list)):
        raise InputError(f"dict keys must be scalars to write JSON, got a {type(key).__name__}")
    return plain if isinstance(plain, str) else json.dumps(plain)


def load_results(path: str | os.PathLike, merge: list | tuple = ()) -> dict:
    """A resumable results file ({key: record}, {} if absent) plus the records of the ``merge`` files (e.g. the
    parts that parallel workers wrote); when there are any, the merged dict is written back to ``path``."""
    path = Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    for part in merge:
        results.update(json.loads(Path(part).read_text()))
    if merge:
        write_json(path, results)
    return results


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    """Writes ``obj`` as JSON atomically: a reader sees the old file or the new one, never half of one.

    The text goes to a temporary file in the same directory, is flushed and fsynced, then ``os.replace``d over
    ``path`` (an atomic rename on POSIX and Windows). Parent directories are created. Values are converted with
    ``to_plain`` first, so a conversion error leaves nothing behind.

    Args:
        path: the destination file.
        obj: what to write (see ``to_plain`` for the accepted types).
        indent: JSON indentation.
    Returns:
        The destination path.
    """
    text = json.dumps(to_plain(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---- tables ------------------------------------------------------------------------------------------------------
def _scalar(value):
    """Tensors with one element and numpy scalars as Python numbers (NaN kept); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _column_decimals(values: list) -> int | None:
    """Decimals for the floats of one column (about 4 significant digits of the largest); None: scientific."""
    finite = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    largest = max(finite, default=0.0)
    if largest == 0.0:
        return 2
    if largest >= 1e7 or largest < 1e-4:
        return None
    return min(6, max(2, 3 - math.floor(math.log10(largest))))


def format_number(value, decimals: int | None = 2) -> str:
    """One cell: ints as they are, floats with ``decimals`` places (None: 3-digit scientific), NaN as 'nan'."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.3e}" if decimals is None else f"{value:.{decimals}f}"


def _table_cells(rows: Sequence[Mapping], columns: Sequence[str] | None) -> tuple[list[str], list[list[str]],
                                                                                    list[bool]]:
    """Header, formatted cells and per-column 'is numeric' flags, shared by both table styles."""
    if isinstance(rows, Mapping) or not all(isinstance(row, Mapping) for row in rows):
        raise InputError("rows must be a list of dicts, one dict per table row")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = [str(column) for column in columns]
    if not columns:
        raise InputError("nothing to tabulate: give at least one row or a list of columns")
    if rows:
        absent = [c for c in columns if not any(c in row for row in rows)]
        if absent:
            known = sorted({key for row in rows for key in row})
            raise InputError(f"columns {absent} appear in no row; the rows have {known}")
    cell_rows = [{column: _scalar(row.get(column)) for column in columns} for row in rows]
    cells: list[list[str]] = [[] for _ in rows]
    numeric: list[bool] = []
    for column in columns:
        values = [row[column] for row in cell_rows]
        present = [v for v in values if v is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))
        decimals = _column_decimals([v for v in values if isinstance(v, float)])
        for cell_row, value in zip(cells, values, strict=True):
            if value is None:
                cell_row.append(MISSING)
            elif _is_number(value):
                cell_row.append(format_number(value, decimals))
            else:
                cell_row.append(" ".join(str(value).split()))  # one line per cell
    return columns, cells, numeric


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """An aligned plain-text table: numbers right-aligned, text left-aligned, missing values as '-'.

    Floats in a column share one number of decimals (about four significant digits of the column's largest
    value, between 2 and 6; scientific notation for columns of huge or tiny values), so decimal points line up.

    Args:
        rows: one dict per row; values may be numbers, strings, None, tensors or numpy scalars.
        columns: the columns, in order; default: every key, in order of first appearance.
        title: an optional line printed above the table.
    Returns:
        The table, lines joined by newlines, without a trailing newline.
    """
    columns, cells, numeric = _table_cells(rows, columns)
    widths = [max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if is_num else v.ljust(w) for v, w, is_num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [title] if title else []
    lines += [line(columns), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """The same table as GitHub-flavoured Markdown (numeric columns right-aligned, '|' escaped in cells).

    Args:
        rows: one dict per row.
        columns: the columns, in order; default: every key, in order of first appearance.
        title: an optional bold line above the table.
    Returns:
        The Markdown text, without a trailing newline.
    """
    columns, cells, numeric = _table_cells(rows, columns)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [f"**{title}**", ""] if title else []
    lines += [line(columns), "|" + "|".join("---:" if is_num else ":---" for is_num in numeric) + "|"]
    lines += [line(row) for row in cells]
    return "\n".join(lines)


# ---- figures: helpers --------------------------------------------------------------------------------------------
def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")  # no bbox_inches='tight': the PNG keeps exactly figsize * dpi pixels
    return path


def _as_array(values, name: str, ndim: int | None = None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().float().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be numeric (a list, array or tensor), got {type(values).__name__}") from err
    if ndim is not None and array.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _display_image(image) -> tuple[np.ndarray, str | None]:
    """An image as [H, W] (grey) or [H, W, 3|4] in [0, 1] for imshow; accepts CHW or HWC, uint8 or float."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    is_uint8 = array.dtype == np.uint8
    array = array.astype(np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW (torch) -> HWC (matplotlib)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"an image must be [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got {array.shape}")
    if not np.isfinite(array).all():
        raise InputError("the image contains NaN or Inf")
    if is_uint8:
        array = array / 255.0
    elif array.min() < 0 or array.max() > 1:
        # normalized (mean/std) inputs: stretch to [0, 1] for display only
        span = array.max() - array.min()
        array = (array - array.min()) / (span if span > 0 else 1.0)
    return array, ("gray" if array.ndim == 2 else None)


def _draw_image(axis, image, caption: str | None = None) -> None:
    pixels, cmap = _display_image(image)
    axis.imshow(pixels, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if caption:
        axis.set_xlabel(caption, fontsize=8)


def _check_trajectory(trajectory, class_names: Sequence[str], true_label) -> np.ndarray:
    array = _as_array(trajectory, "trajectory", ndim=2)
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"trajectory must be [S+1, K] with at least one step and one class, got {array.shape}")
    if len(class_names) != array.shape[1]:
        raise InputError(f"class_names has {len(class_names)} names but the trajectory has K = {array.shape[1]} "
                         f"classes; pass one name per class")
    if not np.isfinite(array).all() or (array < 0).any():
        raise InputError("trajectory must hold finite, non-negative probabilities")
    if true_label is not None and not 0 <= int(true_label) < array.shape[1]:
        raise InputError(f"true_label {int(true_label)} is outside [0, {array.shape[1] - 1}]")
    return array


def _draw_trajectory(axis, trajectory: np.ndarray, class_names: Sequence[str], true_label,
                     max_classes: int, legend: bool = True) -> None:
    """Stacked areas of the most probable final classes (plus 'other') against the reverse step."""
    final = trajectory[-1]
    shown = [int(j) for j in np.argsort(-final, kind="stable")[:max_classes]]
    if true_label is not None and int(true_label) not in shown:
        shown[-1] = int(true_label)  # always show the true class, even when the model ranks it low
    shown.sort(key=lambda j: -final[j])
    steps = np.arange(trajectory.shape[0])
    series = [trajectory[:, j] for j in shown]
    rest = np.clip(trajectory.sum(axis=1) - np.sum(series, axis=0), 0.0, None)
    palette = [f"C{i}" for i in range(len(shown))]
    labels = [f"{class_names[j]} (true)" if true_label is not None and j == int(true_label) else str(class_names[j])
              for j in shown]
    if rest.max() > 1e-6:
        series.append(rest)
        palette.append("0.85")
        labels.append(f"other {trajectory.shape[1] - len(shown)}")
    areas = axis.stackplot(steps, *series, colors=palette, labels=labels, edgecolor="white", linewidth=0.5)
    if true_label is not None:
        areas[shown.index(int(true_label))].set_hatch("///")
    axis.set_xlim(0, max(steps[-1], 1))
    axis.set_ylim(0, 1)
    axis.set_xticks(steps if len(steps) <= 17 else np.linspace(0, steps[-1], 9).round().astype(int))
    axis.set_xlabel("reverse step (t = 1 \u2192 \u03b5)", fontsize=8)
    axis.set_ylabel("p(class | x)", fontsize=8)
    axis.tick_params(labelsize=7)
    predicted = int(np.argmax(final))
    heading = f"predicted {class_names[predicted]} ({final[predicted]:.2f})"
    if true_label is not None:
        heading += f", true {class_names[int(true_label)]}"
    axis.set_title(heading, fontsize=9)
    if legend:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False, reverse=True)


# ---- figures -----------------------------------------------------------------------------------------------------
def plot_reliability(bins_by_method: Mapping[str, Mapping], path: str | os.PathLike, title: str | None = None,
                     figsize: tuple[float, float] | None = None, dpi: int = 100) -> Path:
    """Reliability diagrams side by side, one per method, with the share of examples per bin underneath.

    Args:
        bins_by_method: method name -> ``didicm.metrics.reliability_bins(...)`` output (edges, confidence,
            accuracy, count, and optionally ece).
        path: the PNG to write.
        title: an optional figure title.
        figsize: inches; default (3.2 * number of methods, 4.0).
        dpi: pixels per inch.
    Returns:
        ``path``.
    """
    if not bins_by_method:
        raise InputError("plot_reliability needs at least one method's bins")
    figure = Figure(figsize=figsize or (3.2 * len(bins_by_method), 4.0), dpi=dpi, layout="constrained")
    grid = figure.add_gridspec(2, len(bins_by_method), height_ratios=[3, 1])
    for column, (method, bins) in enumerate(bins_by_method.items()):
        missing = {"edges", "accuracy", "confidence", "count"} - set(bins)
        if missing:
            raise InputError(f"bins for {method!r} lack {sorted(missing)}; pass didicm.metrics.reliability_bins()")
        edges = _as_array(bins["edges"], "edges", ndim=1)
        count = _as_array(bins["count"], "count", ndim=1)
        if len(edges) != len(count) + 1 or len(bins["accuracy"]) != len(count) != len(bins["confidence"]):
            raise InputError(f"bins for {method!r}: need B + 1 edges and B accuracies, confidences and counts")
        # empty bins come as None: draw nothing there
        accuracy = np.array([np.nan if a is None else float(a) for a in bins["accuracy"]])
        confidence = np.array([np.nan if c is None else float(c) for c in bins["confidence"]])
        left, width = edges[:-1], np.diff(edges)
        top = figure.add_subplot(grid[0, column])
        top.bar(left, np.nan_to_num(accuracy), width=width, align="edge", color="C0", edgecolor="white",
                label="accuracy")
        gap_bottom = np.fmin(accuracy, confidence)
        top.bar(left, np.nan_to_num(np.abs(confidence - accuracy)), bottom=np.nan_to_num(gap_bottom), width=width,
                align="edge", color="C3", alpha=0.35, hatch="//", edgecolor="C3", linewidth=0.0, label="gap")
        top.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(method, fontsize=10)
        top.set_ylabel("accuracy" if column == 0 else "")
        top.tick_params(labelsize=8, labelbottom=False)
        if "ece" in bins and bins["ece"] is not None:
            top.text(0.04, 0.93, f"ECE = {100 * float(bins['ece']):.2f}%", transform=top.transAxes, fontsize=9,
                     va="top", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
        if column == 0:
            top.legend(loc="lower right", fontsize=7)
        bottom = figure.add_subplot(grid[1, column], sharex=top)
        share = count / max(count.sum(), 1)
        bottom.bar(left, share, width=width, align="edge", color="0.55", edgecolor="white")
        bottom.set_ylim(0, 1)
        bottom.set_xlabel("confidence (max probability)", fontsize=9)
        bottom.set_ylabel("share" if column == 0 else "", fontsize=9)
        bottom.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def plot_accuracy_vs_steps(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                           baselines: Mapping[str, float] | None, path: str | os.PathLike, title: str | None = None,
                           ylabel: str = "top-1 accuracy (%)", figsize: tuple[float, float] = (6.0, 4.0),
                           dpi: int = 100) -> Path:
    """Accuracy against the number of sampler steps, one line per sampler, baselines as dashed lines.

    The step axis is logarithmic (base 2) when every step count is positive and they span a factor of 4 or
    more, as in a sweep over S in {1, 2, 4, 8, 16}; ticks sit at the step counts given.

    Args:
        curves: name -> (steps, accuracies), e.g. ``{"CP": ([1, 2, 4, 8], [88.1, 90.2, 90.5, 90.6])}``.
        baselines: name -> accuracy of a one-pass model (the twin), drawn as horizontal lines; may be empty.
        path: the PNG to write.
        title: an optional title.
        ylabel: the y-axis label.
        figsize: inches.
        dpi: pixels per inch.
    Returns:
        ``path``.
    """
    if not curves and not baselines:
        raise InputError("plot_accuracy_vs_steps needs at least one curve or baseline")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axis = figure.add_subplot()
    all_steps: set[float] = set()
    for index, (name, curve) in enumerate(curves.items()):
        if len(curve) != 2:
            raise InputError(f"curve {name!r} must be a pair (steps, accuracies)")
        steps, values = _as_array(curve[0], f"{name} steps", 1), _as_array(curve[1], f"{name} accuracies", 1)
        if len(steps) != len(values) or len(steps) == 0:
            raise InputError(f"curve {name!r}: {len(steps)} steps but {len(values)} accuracies; give one per step")
        order = np.argsort(steps)
        axis.plot(steps[order], values[order], marker="o", color=f"C{index}", label=name)
        all_steps.update(steps.tolist())
    for index, (name, value) in enumerate((baselines or {}).items(), start=len(curves)):
        axis.axhline(float(value), color=f"C{index}", linestyle="--", linewidth=1.2, label=f"{name} ({value:.2f})")
    if all_steps:
        ticks = sorted(all_steps)
        if ticks[0] > 0 and ticks[-1] / ticks[0] >= 4:
            axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()
    axis.set_xlabel("sampler steps S (network evaluations per image for CP)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    return _save(figure, path)


def plot_trajectory(trajectory, class_names: Sequence[str], path: str | os.PathLike, image=None,
                    true_label: int | None = None, max_classes: int = 6, figsize: tuple[float, float] | None = None,
                    dpi: int = 100) -> Path:
    """How one image's class distribution moves from uniform (step 0, t = 1) to sharp (step S).

    Stacked areas: the ``max_classes`` most probable final classes (the true one always among them, hatched)
    and the rest as 'other', the image at the left.

    Args:
        trajectory: [S+1, K] float, the CP state at every step (``CPSampler.run(..., return_trajectory=True)``
            gives [B, S+1, K]; pass one row).
        class_names: K names.
        path: the PNG to write.
        image: optional [H, W], [H, W, C] or [C, H, W] image (uint8, or float; normalized ones are stretched).
        true_label: optional true class index.
        max_classes: how many classes get their own band.
        figsize: inches; default (8, 3) with an image, (6, 3) without.
        dpi: pixels per inch.
    Returns:
        ``path``.
    """
    array = _check_trajectory(trajectory, class_names, true_label)
    figure = Figure(figsize=figsize or ((8.0 if image is not None else 6.0), 3.0), dpi=dpi, layout="constrained")
    if image is not None:
        image_axis, axis = figure.subplots(1, 2, width_ratios=[1, 3])
        _draw_image(image_axis, image)
    else:
        axis = figure.add_subplot()
    _draw_trajectory(axis, array, class_names, true_label, max_classes)
    return _save(figure, path)


def plot_trajectories_grid(images, trajectories, class_names: Sequence[str], labels, path: str | os.PathLike,
                           max_classes: int = 5, figsize: tuple[float, float] | None = None, dpi: int = 100) -> Path:
    """A few test images, one row each: the image, then its class distribution over the reverse steps.

    Args:
        images: N images ([N, C, H, W] tensor/array, or a list of single images; see ``plot_trajectory``).
        trajectories: [N, S+1, K] float.
        class_names: K names.
        labels: [N] true classes, or None.
        path: the PNG to write.
        max_classes: bands per row.
        figsize: inches; default (8, 2.2 * N).
        dpi: pixels per inch.
    Returns:
        ``path``.
    """
    trajectories = _as_array(trajectories, "trajectories", ndim=3)
    count = trajectories.shape[0]
    if count == 0 or len(images) != count or (labels is not None and len(labels) != count):
        raise InputError(f"need one image, one trajectory and one label per row; got {len(images)} images, "
                         f"{count} trajectories and {'no' if labels is None else len(labels)} labels")
    checked = [_check_trajectory(trajectories[i], class_names, None if labels is None else int(labels[i]))
               for i in range(count)]
    figure = Figure(figsize=figsize or (8.0, 2.2 * count), dpi=dpi, layout="constrained")
    axes = figure.subplots(count, 2, width_ratios=[1, 3], squeeze=False)
    for row in range(count):
        true_label = None if labels is None else int(labels[row])
        _draw_image(axes[row, 0], images[row])
        _draw_trajectory(axes[row, 1], checked[row], class_names, true_label, max_classes)
    return _save(figure, path)


def plot_gap(axes: Mapping[str, tuple[Sequence, Sequence[float], Sequence[float] | None]], path: str | os.PathLike,
             title: str | None = None, ylabel: str = "top-1 gap, DiDiCM \u2212 twin (points)",
             figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 100) -> Path:
    """The DiDiCM - twin gap against the uncertainty level, one line (mean +- std band) per axis.

    Axes measure uncertainty in different units (pixels, data ratio), so the x-axis is the level's rank, from
    the least uncertain (left) to the most; each point is labelled with its level as given.

    Args:
        axes: axis name -> (levels, mean gaps, std gaps or None), levels ordered from least to most uncertain,
            e.g. ``{"resolution": (["28 px", "14 px", "7 px"], [0.1, 0.8, 2.3], [0.2, 0.3, 0.4])}``.
        path: the PNG to write.
        title: an optional title.
        ylabel: the y-axis label.
        figsize: inches.
        dpi: pixels per inch.
    Returns:
        ``path``.
    """
    if not axes:
        raise InputError("plot_gap needs at least one uncertainty axis")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    plot = figure.add_subplot()
    most_levels = 0
    for index, (name, entry) in enumerate(axes.items()):
        if len(entry) != 3:
            raise InputError(f"axis {name!r} must be (levels, mean_gaps, std_gaps); std_gaps may be None")
        levels, means = list(entry[0]), _as_array(entry[1], f"{name} mean gaps", 1)
        stds = None if entry[2] is None else _as_array(entry[2], f"{name} std gaps", 1)
        if len(levels) != len(means) or (stds is not None and len(stds) != len(means)) or not levels:
            raise InputError(f"axis {name!r}: give as many mean gaps (and std gaps) as levels, at least one")
        ranks = np.arange(1, len(levels) + 1)
        most_levels = max(most_levels, len(levels))
        color = f"C{index}"
        plot.plot(ranks, means, marker="o", color=color, label=name)
        if stds is not None:
            plot.fill_between(ranks, means - stds, means + stds, color=color, alpha=0.2, linewidth=0)
        for rank, mean, level in zip(ranks, means, levels, strict=True):
            text = f"{level:g}" if _is_number(level) else str(level)
            plot.annotate(text, (rank, mean), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7,
                          color=color)
    plot.axhline(0.0, color="0.3", linewidth=1)
    plot.set_xticks(np.arange(1, most_levels + 1))
    plot.set_xlim(0.7, most_levels + 0.3)
    plot.set_xlabel("uncertainty level (1 = least uncertain)")
    plot.set_ylabel(ylabel)
    plot.grid(alpha=0.3)
    plot.legend(fontsize=8)
    if title:
        plot.set_title(title)
    return _save(figure, path)


def plot_frontier(points: Mapping[str, tuple[float, float, float, float]], path: str | os.PathLike,
                  title: str | None = None, figsize: tuple[float, float] = (9.0, 6.0), dpi: int = 100) -> Path:
    """Top-1 (with its seed std) against the cost per image, one labelled point per prediction row.

    Args:
        points: row name -> (cost per image in twin passes, top-1 mean, top-1 std, NLL after temperature scaling);
            the NLL is printed beside each label. Rows more than 10 points below the median are listed under the
            plot instead of stretching its scale.
    """
    figure = Figure(figsize=figsize)
    axis = figure.add_subplot(1, 1, 1)
    floor = float(np.median([p[1] for p in points.values()])) - 10.0 if points else 0.0
    off_chart = []
    for name, (cost, top1, std, nll) in points.items():
        if top1 < floor:
            off_chart.append(f"{name}: {top1:.1f}% at {cost:.2g}")
            continue
        colour = "C1" if name.startswith("didicm") else "C0"
        axis.errorbar([cost], [top1], yerr=[std], fmt="o", color=colour, capsize=3)
        axis.annotate(f"{name} ({nll:.3f})", (cost, top1), textcoords="offset points", xytext=(4, 3), fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("cost per image (passes of the twin, counted FLOPs)"
                    + (f"\noff the chart: {'; '.join(off_chart)}" if off_chart else ""))
    axis.set_ylabel("top-1 accuracy (%)")
    axis.grid(alpha=0.3)
    axis.set_title((title + "\n" if title else "") + "orange: DiDiCM rows; in brackets: NLL after temperature "
                   "scaling", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)
