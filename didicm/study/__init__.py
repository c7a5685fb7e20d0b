"""The uncertainty study: DiDiCM against the classifiers a user would pick instead, over a grid of input
resolutions and training-data ratios (protocol: issue 12 and the README's study section).

``didicm study CONFIG`` trains every arm of every (resolution, data ratio, seed) cell by one rule (an epoch
budget, validation after every interval, the best validation's weights kept, early stopping by patience),
saves every arm's class probabilities on the validation split, the test split and two shifted sets
(``predictions/<cell>.npz``, float16), and computes every metric from those saved arrays: top-1, NLL, ECE,
Brier before and after a temperature fitted on validation, selective prediction (AURC, accuracy at 90%
coverage), out-of-distribution AUROC, and, for DiDiCM, uncertainty scores read off the CP trajectory.

Work is cached per arm: a cell's JSON is rewritten after every arm, an arm whose recipe is unchanged is read
back, and an arm's training resumes from its last checkpoint, so a stopped run continues where it stopped.
``aggregate`` then writes study.json, the figures and report.md, whose prose is generated from the numbers.

The package: ``spec`` (the config and what defines an arm), ``cells`` (training and predicting one cell),
``scores`` (metrics from saved predictions), ``summary`` (across seeds: gaps, verdicts, costs, the
recommendation), ``writeup`` (study.json, figures, report.md) and ``run`` (the grid).
"""

from .run import run_study
from .scores import arm_metrics, trajectory_scores
from .spec import HEADLINE, load_study
from .summary import row_costs
from .writeup import aggregate

__all__ = ["load_study", "run_study", "aggregate", "arm_metrics", "trajectory_scores", "row_costs", "HEADLINE"]
