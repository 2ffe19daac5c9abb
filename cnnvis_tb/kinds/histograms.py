"""Parameter and gradient histograms, binned on the tensor's own device so only the counts travel."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.kinds.base import Kind, Output, StepContext

__all__ = ["histogram", "log_histograms", "parameter_histograms", "write_histograms", "Histograms"]


def _stats(v: torch.Tensor) -> list[float]:
    """Min, max, sum and sum of squares of a flat tensor, in one read back from its device."""
    lo, hi = torch.aminmax(v)
    return torch.stack([lo, hi, v.sum(), v.dot(v)]).tolist()


@torch.no_grad()
def histogram(values: torch.Tensor, bins: int = 64) -> dict | None:
    """Summary of the finite values of a tensor: ``{"min", "max", "num", "sum", "sum_squares",
    "bucket_limits", "bucket_counts", "nonfinite"}`` (arguments of ``SummaryWriter.add_histogram_raw``),
    or None when no value is finite."""
    v = values.detach().flatten().float()
    if v.numel() == 0:
        return None
    nonfinite = 0
    lo, hi, total, squares = _stats(v)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN and inf reach the min or the max: all finite when both are
        finite = torch.isfinite(v)
        nonfinite = int(v.numel() - finite.sum())
        v = v[finite]
        if v.numel() == 0:
            return None
        lo, hi, total, squares = _stats(v)
    if hi <= lo:
        hi = lo + 1e-6 * max(1.0, abs(lo))
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    limits = torch.linspace(lo, hi, bins + 1)[1:]
    return {
        "min": lo,
        "max": hi,
        "num": int(v.numel()),
        "sum": total,
        "sum_squares": squares,
        "bucket_limits": limits.tolist(),
        "bucket_counts": counts.cpu().tolist(),
        "nonfinite": nonfinite,
    }


def log_histograms(writer, model: nn.Module, step: int, bins: int = 64) -> dict[str, int]:
    """Write a histogram of every parameter (and of its ``.grad`` when present) under ``cnnvis/histograms/``.

    Returns ``{tag: number of non-finite values skipped}`` for the tensors that had any.
    """
    summaries, skipped = parameter_histograms(model, bins)
    write_histograms(writer, summaries, step)
    return skipped


def parameter_histograms(model: nn.Module, bins: int = 64) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """The histograms :func:`log_histograms` writes, as ``[(tag, add_histogram_raw arguments)]``, and
    ``{tag: non-finite values skipped}``: numbers only, so they can be written later (the model may have changed)."""
    summaries: list[tuple[str, dict]] = []
    skipped: dict[str, int] = {}
    for name, param in model.named_parameters():
        for view, tensor in (("weight", param), ("grad", param.grad)):
            if tensor is None:
                continue
            tag = tags.histogram_tag(name, view)
            summary = histogram(tensor, bins)
            if summary is None:
                skipped[tag] = tensor.numel()
                continue
            nonfinite = summary.pop("nonfinite")
            if nonfinite:
                skipped[tag] = nonfinite
            summaries.append((tag, summary))
    return summaries, skipped


def write_histograms(writer, summaries: list[tuple[str, dict]], step: int) -> None:
    """Write what :func:`parameter_histograms` returned, at ``step``."""
    for tag, summary in summaries:
        writer.add_histogram_raw(tag, global_step=step, **summary)


class Histograms(Kind):
    """The ``histograms`` kind: every parameter's histogram, and its gradient's when ``.grad`` exists, under
    ``cnnvis/histograms/<module>/<tensor>`` (read by the stock Histograms tab)."""

    name, label, every = "histograms", "Histograms", 100
    layer_role = None
    log_in_background = True  # compute bins the parameters (on their device); log writes the counts

    def compute(self, ctx: StepContext) -> tuple[list[tuple[str, dict]], dict[str, int]]:
        return parameter_histograms(ctx.net)

    def log(self, ctx: StepContext, out: Output, computed) -> None:
        summaries, skipped = computed
        write_histograms(out.writer, summaries, ctx.step)
        for tag, count in skipped.items():
            ctx.warn_once(f"hist-{tag}", f"{count} non-finite values left out of the histogram {tag}")
