"""Grad-CAM and Grad-CAM++: class-discriminative heatmaps from a layer's activations and gradients.

Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activation only, so parameters'
``.grad`` are never touched, and each image gets its own target class. Maps are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.hooks import capture
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext
from cnnvis_tb.layers import resolve_layer, select_output, unwrap_model
from cnnvis_tb.render import as_rgb, caption, fit, make_grid, overlay_heatmap, to_uint8
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["grad_cam", "cam_from_gradients", "normalize_maps", "resolve_targets", "METHODS", "GradCam"]

METHODS = ("gradcam", "gradcam++")
_EPS = 1e-7


def cam_from_gradients(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """Class activation maps ``[N, h, w]`` (ReLU applied, not normalized) from ``[N, K, h, w]`` tensors.

    * ``gradcam``:   ``relu(sum_k mean_ij(g_k) * A_k)``
    * ``gradcam++``: ``alpha = g² / (2 g² + sum_ij(A) g³)`` (0 where the denominator is 0),
      ``w_k = sum_ij(alpha * relu(g))``, ``relu(sum_k w_k A_k)``
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    a = activations.detach().float()
    g = gradients.detach().float()
    if method == "gradcam":
        weights = g.mean(dim=(2, 3))
    else:
        # alpha * relu(g) = g² relu(g) / (g² (2 + sum(A) g)) = relu(g) / (2 + sum(A) g) where g > 0;
        # the g² factor cancels, which saves two full-size products and guards g = 0 for free.
        denom = 2 + a.sum(dim=(2, 3), keepdim=True) * g
        safe = (g > 0) & (denom != 0)
        weights = torch.where(safe, g / torch.where(safe, denom, 1.0), 0.0).sum(dim=(2, 3))
    return torch.einsum("nk,nkhw->nhw", weights, a).clamp_min(0)


def normalize_maps(maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize ``[N, h, w]`` maps bilinearly to ``size`` and scale each to ``[0, 1]`` by its own min and max.

    A constant map (for instance all zero, when no location supports the class) becomes all zero rather
    than NaN.
    """
    maps = maps.float()
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return (maps - lo).mul_(torch.where(span > _EPS, 1.0 / span.clamp_min(_EPS), 0.0))


def resolve_targets(targets: int | Sequence[int] | torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """Per-image class indices ``[N]`` (long, on ``scores``' device): None → predicted class, int → that class
    for every image, sequence/tensor → one class per image. Out-of-range classes raise ``ValueError``."""
    n, num_classes = scores.shape
    if targets is None:
        return scores.detach().argmax(dim=1)
    if isinstance(targets, int):
        t = torch.full((n,), targets, dtype=torch.long, device=scores.device)
    else:
        t = torch.as_tensor(targets, device=scores.device).long().flatten()
        if t.numel() != n:
            raise ValueError(f"targets must give one class per image: expected {n}, got {t.numel()}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target class out of range: model has {num_classes} classes, got {t.tolist()}")
    return t


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str | nn.Module,
    targets: int | Sequence[int] | torch.Tensor | None = None,
    method: str = "gradcam",
    *,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grad-CAM (``method="gradcam"``) or Grad-CAM++ (``"gradcam++"``) heatmaps for ``images``.

    Args:
        model: a classifier; wrappers (DataParallel, DDP, ``torch.compile``) are looked through.
        images: ``[N, C, H, W]`` as the model sees them (normalized).
        layer: the module or its ``named_modules()`` name, e.g. ``"layer4"``.
        targets: None (each image's predicted class), an int (one class for all) or one class per image.
        method: ``"gradcam"`` or ``"gradcam++"``.
        output_selector: picks the ``[N, num_classes]`` scores from a model returning a tuple or dict.

    Returns:
        Detached float32 ``[N, H, W]`` at the input's resolution, each map scaled to ``[0, 1]``.
        The model is left exactly as it was (modes, gradients, RNG, hooks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W], got {shape}")
    net = unwrap_model(model)
    name, module = resolve_layer(net, layer)
    with preserved(net):
        x = images.detach().to(device=model_device(net), dtype=model_dtype(net))
        with capture({name: module}, for_grad=True) as acts:
            scores = select_output(net(x), output_selector)
        if name not in acts:
            raise RuntimeError(f"layer {name!r} did not run in the forward pass; choose a layer the model uses")
        if acts[name].dim() != 4:
            raise ValueError(
                f"layer {name!r} outputs shape {tuple(acts[name].shape)}; Grad-CAM needs a spatial map [N, C, H, W]"
            )
        t = resolve_targets(targets, scores)
        score = scores.gather(1, t[:, None]).sum()
        (grads,) = torch.autograd.grad(score, acts[name])
        maps = cam_from_gradients(acts[name], grads, method)
    return normalize_maps(maps, tuple(images.shape[-2:])).detach()


#: Pixels per panel of a Grad-CAM strip: legible captions, small files for big inputs.
PANEL = 96


class GradCam(Kind):
    """The ``gradcam`` kind: per CAM layer and probe image, a strip of the input and the Grad-CAM and Grad-CAM++
    overlays for the true class (with probe labels) and the predicted class (``cnnvis/gradcam/<layer>/probe_<i>``),
    every map from the one shared forward and backward pass."""

    name, label, every = "gradcam", "Grad-CAM", 200
    follows_layer_list = False  # a plain layers=[...] list names layers to look inside; Grad-CAM keeps its own

    def default_layers(self, info: ModelInfo) -> list[str]:
        return [info.cam_layer()]

    def needs(self) -> Needs:
        return Needs(graph_activations=tuple(self.layers))

    def log(self, ctx: StepContext, out: Output, computed: object) -> None:
        shared, shown, label_of = ctx.shared, ctx.shown, ctx.info.class_label
        size = tuple(shown.shape[-2:])
        probs = shared.probabilities
        targets = {k: v.cpu() for k, v in shared.targets.items()}
        order = [k for k in ("true", "pred") if k in targets]
        inputs = fit(as_rgb(shown), PANEL, PANEL)
        for layer, _ in self.each_layer(ctx.net):
            acts = shared.graph_activations[layer]
            columns = []  # (overlays [N, 3, panel, panel], method label, target key), all images at once
            for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++")):
                for key in order:
                    grads = shared.grads[key][layer]
                    if grads is None:
                        raise RuntimeError(f"the class scores do not depend on layer {layer!r}")
                    maps = normalize_maps(cam_from_gradients(acts, grads, method), size).cpu()
                    columns.append((fit(overlay_heatmap(shown, maps), PANEL, PANEL), label, key))
            for i in range(shown.shape[0]):
                true = f"true: {label_of(int(targets['true'][i]))}" if "true" in targets else "label unknown"
                panels = [caption(inputs[i], ["input", true])]
                for overlays, label, key in columns:
                    cls = int(targets[key][i])
                    panels.append(caption(overlays[i], [label, f"{key}: {label_of(cls)} {probs[i, cls]:.0%}"]))
                strip = make_grid(torch.stack(panels), ncol=len(panels), padding=2)
                out.image(layer, tags.probe_view(i), to_uint8(strip))
