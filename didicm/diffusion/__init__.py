"""The math of the label diffusion: schedules, the forward process, the loss and the samplers."""

from .loss import score_entropy
from .process import UniformDiffusion
from .samplers import CLSampler, CPSampler, exponential_reverse_step, reverse_rate_times, time_grid
from .schedules import GeometricSchedule, LogLinearSchedule, NoiseSchedule, create_schedule

__all__ = [
    "CLSampler", "CPSampler", "GeometricSchedule", "LogLinearSchedule", "NoiseSchedule", "UniformDiffusion",
    "create_schedule", "exponential_reverse_step", "reverse_rate_times", "score_entropy", "time_grid",
]
