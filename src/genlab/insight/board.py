"""TensorBoard for the pictures: the run's writer, and histograms counted by torch."""

from __future__ import annotations

import torch


def tensorboard(trainer):
    """The run's TensorBoard writer, if it has one."""
    return next((lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_histogram")), None)


def add_histogram(tb, tag: str, values: torch.Tensor, step: int, bins: int = 60) -> None:
    """A TensorBoard histogram counted by torch. (``add_histogram`` counts with numpy, which
    slowed the training after each call.)"""
    values = values.flatten().float()
    low, high = values.min().item(), values.max().item()
    counts = torch.histc(values, bins=bins, min=low, max=high)
    limits = torch.linspace(low, high, bins + 1)[1:]
    tb.add_histogram_raw(tag, min=low, max=high, num=values.numel(), sum=values.sum().item(),
                         sum_squares=values.pow(2).sum().item(), bucket_limits=limits.tolist(),
                         bucket_counts=counts.tolist(), global_step=step)
