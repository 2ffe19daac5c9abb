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
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext, positive_int
from cnnvis_tb.kinds.cam_methods import METHODS, CamInputs, Scorer, bias_layers, check_methods, linear_head
from cnnvis_tb.layers import resolve_layer, select_output, unwrap_model
from cnnvis_tb.render import as_rgb, caption, fit, make_grid, overlay_heatmap, to_uint8
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["cam", "grad_cam", "cam_from_gradients", "normalize_maps", "resolve_targets", "target_scorer", "GradCam"]

_EPS = 1e-7


def cam_from_gradients(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """Class activation maps ``[N, h, w]`` (ReLU applied, not normalized) of a gradient method of the CAM family
    (``gradcam``, ``gradcam++``, ``xgradcam``, ``hirescam``, ``layercam``, ``eigengradcam``) from ``[N, K, h, w]``
    activations and gradients; formulas in :mod:`cnnvis_tb.kinds.cam_methods`."""
    spec = METHODS.get(method)
    if spec is None or not spec.gradients:
        raise ValueError(f"{method!r} is not a gradient CAM method; expected one of "
                         f"{', '.join(m for m, s in METHODS.items() if s.gradients)}")
    inputs = CamInputs(acts=activations.detach().float(), grads=gradients.detach().float())
    return spec.fn(inputs).clamp_min(0)


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


Targets = int | Sequence[int] | torch.Tensor | Callable[[object], torch.Tensor] | None


def target_scorer(targets: Targets, output: object, output_selector=None) -> tuple[Scorer, torch.Tensor | None]:
    """``(scorer, classes)`` for ``targets`` given the model's ``output`` on the images: ``scorer(output, owner)`` is
    the target score ``[B]`` of each row of a later forward's output, row ``b`` scored for image ``owner[b]``;
    ``classes [N]`` the class per image (None for a callable target)."""
    if callable(targets) and not isinstance(targets, torch.Tensor):
        def scorer(out: object, owner: torch.Tensor) -> torch.Tensor:
            value = targets(output_selector(out) if output_selector is not None else out)
            rows = len(owner)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == 1:
                value = value[:, 0]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows,):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"the targets callable must return one score per image: expected shape ({rows},), "
                                 f"got {got}")
            return value

        scorer(output, torch.arange(_rows(output, output_selector)))  # checked now, on the images themselves
        return scorer, None
    classes = resolve_targets(targets, select_output(output, output_selector))

    def scorer(out: object, owner: torch.Tensor) -> torch.Tensor:
        return select_output(out, output_selector).gather(1, classes[owner][:, None])[:, 0]

    return scorer, classes


def _rows(output: object, output_selector) -> int:
    from cnnvis_tb.hooks import first_tensor

    value = output_selector(output) if output_selector is not None else output
    tensor = value if isinstance(value, torch.Tensor) else first_tensor(value)
    return tensor.shape[0]


def cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str | nn.Module,
    targets: Targets = None,
    method: str = "gradcam",
    *,
    batch_size: int = 64,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A class activation map of the CAM family for ``images``, at the input's resolution.

    Args:
        model: a classifier; wrappers (DataParallel, DDP, ``torch.compile``) are looked through.
        images: ``[N, C, H, W]`` as the model sees them (normalized).
        layer: the module or its ``named_modules()`` name, e.g. ``"layer4"`` (FullGrad ignores it).
        targets: None (each image's predicted class), an int (one class for all), one class per image, or a
            callable mapping the model's output (after ``output_selector``) to one score per image ``[N]``
            (multi-label logits, a regression output, a sum of classes).
        method: one of :data:`cnnvis_tb.kinds.cam_methods.METHODS` (formulas there).
        batch_size: perturbed images per forward pass of Score-CAM and Ablation-CAM (the memory cap).
        output_selector: picks the scores from a model returning a tuple or dict.

    Returns:
        Detached float32 ``[N, H, W]``, each map scaled to ``[0, 1]`` (an all-zero map stays zero). The model is
        left exactly as it was (modes, gradients, RNG, hooks).
    """
    (method,) = check_methods(method)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W], got {shape}")
    batch_size = positive_int("batch_size", batch_size)
    net = unwrap_model(model)
    name, module = resolve_layer(net, layer)
    spec = METHODS[method]
    with preserved(net):
        x = images.detach().to(device=model_device(net), dtype=model_dtype(net))
        biases = bias_layers(net) if spec.full_gradients else {}
        if spec.full_gradients:
            x = x.clone().requires_grad_(True)
        hooked = {name: module, **{n: m for n, (m, _) in biases.items()}}
        with capture(hooked, for_grad=True) as acts, torch.set_grad_enabled(spec.gradients or spec.full_gradients):
            output = net(x)
        if name not in acts:
            raise RuntimeError(f"layer {name!r} did not run in the forward pass; choose a layer the model uses")
        if acts[name].dim() != 4:
            raise ValueError(f"layer {name!r} outputs shape {tuple(acts[name].shape)}; CAM methods need a spatial "
                             "map [N, C, H, W]")
        scorer, classes = target_scorer(targets, output, output_selector)
        base = scorer(output, torch.arange(x.shape[0], device=x.device))
        inputs = CamInputs(acts=acts[name].detach().float(), net=net, layer=name, module=module, images=x.detach(),
                           scorer=scorer, base_scores=base.detach(), batch_size=batch_size)
        if spec.gradients or spec.full_gradients:
            wrt = [acts[name]] + [acts[n] for n in biases if n in acts] + ([x] if spec.full_gradients else [])
            grads = torch.autograd.grad(base.sum(), wrt, allow_unused=True)
            inputs.grads = _zero_if_none(grads[0], acts[name]).float()
            if spec.full_gradients:
                inputs.input_grads = _zero_if_none(grads[-1], x)
                used = [n for n in biases if n in acts]
                inputs.bias_grads = {n: (biases[n][1], _zero_if_none(g, acts[n]).detach())
                                     for n, g in zip(used, grads[1:-1], strict=True)}
        if spec.head:
            if classes is None:
                raise ValueError("method 'cam' weights channels by the classifier's row of a class: give class "
                                 "targets (None, an int or one class per image), not a callable")
            head = linear_head(net, name, module, x.detach(), output_selector)
            inputs.head_weights = head.weight.detach().float()[classes]
        maps = spec.fn(inputs).clamp_min(0)
    return normalize_maps(maps, tuple(images.shape[-2:])).detach()


def _zero_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach()


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str | nn.Module,
    targets: Targets = None,
    method: str = "gradcam",
    *,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grad-CAM (``method="gradcam"``) or Grad-CAM++ (``"gradcam++"``) heatmaps ``[N, H, W]`` in ``[0, 1]``: the
    gradient members of :func:`cam`, kept under their first name."""
    if method not in ("gradcam", "gradcam++"):
        raise ValueError(f"unknown method {method!r}; expected one of ('gradcam', 'gradcam++'), or use cam() for "
                         "the whole CAM family")
    return cam(model, images, layer, targets, method, output_selector=output_selector)


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
