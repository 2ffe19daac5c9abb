"""Saliency: how much each input pixel moves the target class score.

Three methods, each giving ``[N, H, W]`` maps in ``[0, 1]`` (max over colour channels of the gradient's magnitude):

* ``"vanilla"``: the gradient of the class score with respect to the input (Simonyan et al., 2014);
* ``"smoothgrad"``: the gradient averaged over noisy copies of each image (Smilkov et al., 2017), all copies of all
  images in one batch (in chunks of at most ``MAX_BATCH`` images); noise from our own ``torch.Generator``;
* ``"guided"``: guided backpropagation (Springenberg et al., 2015): every ReLU passes back only positive gradients,
  and only where its input was positive. The model is not changed: for the one forward pass, a torch-function mode
  (thread-local) swaps each ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu`` and their in-place forms) for a
  guided one that returns the same values. In-place ReLUs then return a new tensor instead of writing into their
  input, which models that use the returned value (all of torchvision's) do not notice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnvis_tb.kinds.gradcam import normalize_maps, resolve_targets
from cnnvis_tb.layers import select_output, unwrap_model
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["saliency", "saliency_from_gradients", "input_gradients", "check_guided", "SALIENCY_METHODS", "MAX_BATCH"]

SALIENCY_METHODS = ("vanilla", "smoothgrad", "guided")
#: Images per forward pass of SmoothGrad (noisy copies of several probe images share a batch).
MAX_BATCH = 64


def saliency_from_gradients(input_grads: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` input gradients → ``[N, H, W]`` maps in ``[0, 1]``: max over channels of ``|grad|``."""
    return normalize_maps(input_grads.detach().float().abs().amax(dim=1))


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, where the input was positive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _GuidedReLUs(TorchFunctionMode):
    """Within the mode (this thread only), every ReLU call is a guided one; ``count`` says how many ran."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            self.count += 1
            return _GuidedReLU.apply(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


_NO_RELU = ("guided backpropagation needs ReLU activations (nn.ReLU, F.relu, torch.relu); none ran in the model's "
            "forward pass: use the 'vanilla' or 'smoothgrad' saliency method")


def check_guided(net: nn.Module, images: torch.Tensor,
                 output_selector: Callable[[object], torch.Tensor] | None = None) -> None:
    """Raise ``ValueError`` when no ReLU runs in ``net``'s forward pass on ``images`` (guided backprop needs them)."""
    with _GuidedReLUs() as mode:
        select_output(net(images), output_selector)
    if mode.count == 0:
        raise ValueError(_NO_RELU)


def input_gradients(
    net: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | torch.Tensor | None,
    method: str = "vanilla",
    *,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``[N, C, H, W]`` of each image's target class score w.r.t. the image, by ``method``, and the
    targets used ``[N]`` (None: each image's predicted class, from the clean images).

    ``net`` must be unwrapped, in eval mode, with its state preserved by the caller, and ``images`` on its device.
    """
    if method not in SALIENCY_METHODS:
        raise ValueError(f"unknown saliency method {method!r}: use one of {', '.join(SALIENCY_METHODS)}")
    if method == "smoothgrad":
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int (noisy copies per image), got {samples!r}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0 (a fraction of each image's value range), got {noise!r}")
    x = images.detach()
    if method in ("vanilla", "guided"):
        x = x.clone().requires_grad_(True)
        with _GuidedReLUs() if method == "guided" else contextlib.nullcontext() as mode:
            scores = select_output(net(x), output_selector)
        if mode is not None and mode.count == 0:
            raise ValueError(_NO_RELU)
        t = resolve_targets(targets, scores)
        (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), [x])
        return grad, t
    # SmoothGrad: the targets from the clean images, then noisy copies of every image, several images per batch.
    n = x.shape[0]
    with torch.no_grad():
        t = resolve_targets(targets, select_output(net(x), output_selector))
    spread = noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))  # per image
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros_like(x, dtype=torch.float32)
    per_batch = max(1, MAX_BATCH // samples)  # whole images per chunk, so each image's copies share a batch
    for start in range(0, n, per_batch):
        part = slice(start, min(n, start + per_batch))
        clean, k = x[part], x[part].shape[0]
        draws = torch.randn((k, samples, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        noisy = (clean[:, None] + draws * spread[part].view(k, 1, 1, 1, 1)).flatten(0, 1).requires_grad_(True)
        scores = select_output(net(noisy), output_selector)
        picked = scores.gather(1, t[part].repeat_interleave(samples)[:, None])
        (grad,) = torch.autograd.grad(picked.sum(), [noisy])
        total[part] = grad.view(k, samples, *x.shape[1:]).float().mean(dim=1)
    return total, t


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | torch.Tensor | None = None,
    *,
    method: str = "vanilla",
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Saliency maps ``[N, H, W]`` in ``[0, 1]`` for the target classes (None: each image's predicted class).

    Args:
        method: ``"vanilla"`` (input gradient), ``"smoothgrad"`` (gradient averaged over ``samples`` noisy copies,
            noise std ``noise`` × the image's value range, drawn from a generator seeded with ``seed``) or
            ``"guided"`` (guided backpropagation through the model's ReLUs).

    Gradients are taken with ``torch.autograd.grad`` with respect to copies of ``images``; the model is left as it was.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    net = unwrap_model(model)
    with preserved(net):
        x = images.detach().to(device=model_device(net), dtype=model_dtype(net))
        grad, _ = input_gradients(net, x, targets, method, samples=samples, noise=noise, seed=seed,
                                  output_selector=output_selector)
    return saliency_from_gradients(grad)
