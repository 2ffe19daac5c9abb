"""Saliency: how much each input pixel moves the target class score (vanilla gradient)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cnnvis_tb.kinds.gradcam import normalize_maps, resolve_targets
from cnnvis_tb.layers import select_output, unwrap_model
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["saliency", "saliency_from_gradients"]


def saliency_from_gradients(input_grads: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` input gradients → ``[N, H, W]`` maps in ``[0, 1]``: max over channels of ``|grad|``."""
    return normalize_maps(input_grads.detach().float().abs().amax(dim=1))


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | torch.Tensor | None = None,
    *,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Vanilla-gradient saliency maps ``[N, H, W]`` in ``[0, 1]`` for the target classes (None: predicted).

    Gradients are taken with ``torch.autograd.grad`` with respect to a copy of ``images``; the model is left as it was.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    net = unwrap_model(model)
    with preserved(net):
        x = images.detach().to(device=model_device(net), dtype=model_dtype(net)).requires_grad_(True)
        scores = select_output(net(x), output_selector)
        t = resolve_targets(targets, scores)
        (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), [x])
    return saliency_from_gradients(grad)
