"""Saliency: how much each input pixel moves the target class score.

Five methods, each giving ``[N, H, W]`` maps in ``[0, 1]`` (max over colour channels of the gradient's magnitude):

* ``"vanilla"``: the gradient of the class score with respect to the input (Simonyan et al., 2014);
* ``"smoothgrad"``: the gradient averaged over noisy copies of each image (Smilkov et al., 2017), the copies of all
  images batched together, at most ``batch_size`` (default ``MAX_BATCH``) per pass; noise from our own
  ``torch.Generator``;
* ``"guided"``: guided backpropagation (Springenberg et al., 2015): every ReLU passes back only positive gradients,
  and only where its input was positive. The model is not changed: for the one forward pass, a torch-function mode
  (thread-local) swaps each ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu`` and their in-place forms) for a
  guided one that returns the same values. In-place ReLUs then return a new tensor instead of writing into their
  input, which models that use the returned value (all of torchvision's) do not notice.
* ``"deconvnet"``: the deconvolution view (Zeiler & Fergus, 2014), through the same swap: every ReLU passes back the
  positive part of the gradient, wherever its input was (the forward mask is not applied backwards);
* ``"guided_gradcam"``: guided Grad-CAM (Selvaraju et al., 2017): the guided-backpropagation map times the Grad-CAM
  map of the CAM layer, upsampled to the input, rescaled to ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnvis_tb import tags
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext
from cnnvis_tb.kinds.gradcam import PANEL, cam, normalize_maps, resolve_targets
from cnnvis_tb.layers import default_cam_layer, select_output, trace_layers, unwrap_model
from cnnvis_tb.render import as_rgb, captioned_strip, colorize, fit, to_uint8
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["saliency", "saliency_from_gradients", "guided_gradcam", "check_saliency_methods", "Saliency",
           "SALIENCY_METHODS", "MAX_BATCH"]

SALIENCY_METHODS = ("vanilla", "smoothgrad", "guided", "deconvnet", "guided_gradcam")
#: Methods that swap the model's ReLUs for ones with another backward rule during their forward pass.
_RELU_METHODS = ("guided", "deconvnet", "guided_gradcam")
#: Noisy copies per image SmoothGrad averages over by default.
SMOOTHGRAD_SAMPLES = 16
#: Noisy images per forward pass of SmoothGrad by default (copies of several images share a pass).
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
        return torch.where(out > 0, grad.clamp_min(0), torch.zeros_like(grad))


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward is the deconvnet's (Zeiler & Fergus): the positive part of the gradient, wherever the
    input was."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _GuidedReLUs(TorchFunctionMode):
    """Within the mode (this thread only), every ReLU call is a guided one (or, with ``rule=_DeconvReLU``, a
    deconvnet one); ``count`` says how many ran."""

    def __init__(self, rule: type[torch.autograd.Function] = _GuidedReLU) -> None:
        super().__init__()
        self.count = 0
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            self.count += 1
            return self.rule.apply(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


_NO_RELU = ("guided backpropagation needs ReLU activations (nn.ReLU, F.relu, torch.relu); none ran in the model's "
            "forward pass: use the 'vanilla' or 'smoothgrad' saliency method")


def check_guided(net: nn.Module, images: torch.Tensor,
                 output_selector: Callable[[object], torch.Tensor] | None = None) -> None:
    """Raise ``ValueError`` when guided backpropagation cannot be trusted on ``net``: no ReLU runs in its forward
    pass on ``images``; ReLUs sit inside TorchScript modules or run outside this thread (so they would not be
    guided); or the outputs change when the ReLUs are guided (the model relies on an in-place ReLU writing into its
    input). ``net`` must be in eval mode with its state preserved by the caller."""
    scripted = [name or type(net).__name__ for name, m in net.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError(f"guided backpropagation cannot reach ReLUs inside TorchScript modules "
                         f"({', '.join(scripted)}); use the 'vanilla' or 'smoothgrad' saliency method")
    module_calls = []
    handles = [m.register_forward_hook(lambda *_: module_calls.append(1)) for m in net.modules()
               if isinstance(m, nn.ReLU)]
    try:
        with _GuidedReLUs() as mode:
            guided = select_output(net(images), output_selector)
    finally:
        for handle in handles:
            handle.remove()
    if mode.count == 0:
        raise ValueError(_NO_RELU)
    if len(module_calls) > mode.count:
        raise ValueError(f"only {mode.count} of the model's {len(module_calls)} ReLU calls ran in the guided pass (the "
                         "others ran in other threads, e.g. a DataParallel inside the model); guided backpropagation "
                         "would be partial: use the 'vanilla' or 'smoothgrad' saliency method")
    plain = select_output(net(images), output_selector)
    if not torch.allclose(guided.float(), plain.float(), rtol=1e-4, atol=1e-5):
        raise ValueError("the model's outputs change when its ReLUs are guided: it relies on an in-place ReLU writing "
                         "into its input (like `self.relu(x); return x`), which guided backpropagation cannot follow; "
                         "use the ReLU's return value, or the 'vanilla' or 'smoothgrad' saliency method")


def input_gradients(
    net: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | torch.Tensor | None,
    method: str = "vanilla",
    *,
    samples: int = SMOOTHGRAD_SAMPLES,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``[N, C, H, W]`` of each image's target class score w.r.t. the image, by ``method``, and the
    targets used ``[N]`` (None: each image's predicted class, from the clean images).

    ``net`` must be unwrapped, in eval mode, with its state preserved by the caller, and ``images`` on its device.
    SmoothGrad runs at most ``batch_size`` noisy images per pass (default :data:`MAX_BATCH`); the same seed and
    batch size give the same maps.
    """
    if method not in SALIENCY_METHODS:
        raise ValueError(f"unknown saliency method {method!r}: use one of {', '.join(SALIENCY_METHODS)}")
    if method == "smoothgrad":
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int (noisy copies per image), got {samples!r}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0 (a fraction of each image's value range), got {noise!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int (noisy images per pass), got {batch_size!r}")
    x = images.detach()
    if method == "guided_gradcam":
        raise ValueError("guided_gradcam is a map, not a gradient: use saliency(..., method='guided_gradcam')")
    if method in ("vanilla", "guided", "deconvnet"):
        x = x.clone().requires_grad_(True)
        rule = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}.get(method)
        with _GuidedReLUs(rule) if rule is not None else contextlib.nullcontext() as mode:
            scores = select_output(net(x), output_selector)
        if mode is not None and mode.count == 0:
            raise ValueError(_NO_RELU)
        t = resolve_targets(targets, scores)
        (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), [x])
        return grad, t
    # SmoothGrad: noisy copies of every image, at most `batch_size` (image, copy) pairs per pass; a pass may hold
    # copies of several images, and one image's copies may span passes. Noise is drawn pass by pass.
    n = x.shape[0]
    t = None
    if targets is None:  # each image's predicted class, from the clean image
        with torch.no_grad():
            t = resolve_targets(None, select_output(net(x), output_selector))
    spread = noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))  # per image
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros_like(x, dtype=torch.float32)
    batch = MAX_BATCH if batch_size is None else batch_size
    for start in range(0, n * samples, batch):
        owner = torch.arange(start, min(n * samples, start + batch), device=x.device) // samples  # image of each copy
        draws = torch.randn((len(owner), *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        noisy = (x[owner] + draws * spread[owner].view(-1, 1, 1, 1)).requires_grad_(True)
        scores = select_output(net(noisy), output_selector)
        if t is None:  # given targets: checked against the class count of the first pass
            t = resolve_targets(targets, scores.new_empty((n, scores.shape[1])))
        (grad,) = torch.autograd.grad(scores.gather(1, t[owner][:, None]).sum(), [noisy])
        total.index_add_(0, owner, grad.float())
    return total / samples, t


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | torch.Tensor | None = None,
    *,
    method: str = "vanilla",
    samples: int = SMOOTHGRAD_SAMPLES,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    layer: str | nn.Module | None = None,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Saliency maps ``[N, H, W]`` in ``[0, 1]`` for the target classes (None: each image's predicted class).

    Args:
        method: ``"vanilla"`` (input gradient), ``"smoothgrad"`` (gradient averaged over ``samples`` noisy copies,
            noise std ``noise`` × the image's value range, drawn from a generator seeded with ``seed``) or
            ``"guided"`` (guided backpropagation through the model's ReLUs), ``"deconvnet"`` (Zeiler & Fergus: each
            ReLU passes back the positive part of the gradient, wherever its input was) or ``"guided_gradcam"``
            (Selvaraju et al.: the guided-backpropagation map times the Grad-CAM map of ``layer``, upsampled).
        layer: Grad-CAM's layer for ``guided_gradcam`` (default: the last convolutional block before pooling).
        batch_size: SmoothGrad's noisy images per forward pass (default :data:`MAX_BATCH`): the memory bound.

    Gradients are taken with ``torch.autograd.grad`` with respect to copies of ``images``; the model is left as it was.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    net = unwrap_model(model)
    with preserved(net):
        x = images.detach().to(device=model_device(net), dtype=model_dtype(net))
        if method in _RELU_METHODS:
            check_guided(net, x[:1], output_selector)
        if method == "guided_gradcam":
            if layer is None:
                traces, _ = trace_layers(net, x[:1])
                layer = default_cam_layer(traces)
            grad, t = input_gradients(net, x, targets, "guided", output_selector=output_selector)
            return guided_gradcam(saliency_from_gradients(grad),
                                  cam(net, x, layer, t, "gradcam", output_selector=output_selector))
        grad, _ = input_gradients(net, x, targets, method, samples=samples, noise=noise, seed=seed,
                                  batch_size=batch_size, output_selector=output_selector)
    return saliency_from_gradients(grad)


def guided_gradcam(guided: torch.Tensor, gradcam: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM ``[N, H, W]`` in ``[0, 1]``: the guided-backpropagation map (max over colour channels of
    ``|grad|``) times the Grad-CAM map at the input's resolution, rescaled (the product of two maps in ``[0, 1]``)."""
    return normalize_maps(guided.float() * gradcam.float().to(guided.device))


def check_saliency_methods(methods: str | Iterable[str]) -> tuple[str, ...]:
    """One method name or several (in the given order, once each); unknown names raise with close matches."""
    if isinstance(methods, str):
        names = [methods]
    elif isinstance(methods, (set, frozenset)):  # no order of its own: the documented one
        names = sorted(methods, key=lambda m: (SALIENCY_METHODS.index(m) if m in SALIENCY_METHODS else -1, str(m)))
    elif isinstance(methods, Iterable):
        names = list(methods)
    else:
        raise TypeError(f"saliency_methods must be a method name or a list of them ({', '.join(SALIENCY_METHODS)}), "
                        f"got {methods!r}")
    if not names:
        raise ValueError(f"saliency_methods must name at least one of {', '.join(SALIENCY_METHODS)}")
    for name in names:
        if name not in SALIENCY_METHODS:
            close = difflib.get_close_matches(str(name), SALIENCY_METHODS, n=2, cutoff=0.4)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown saliency method {name!r}{hint}; expected some of {', '.join(SALIENCY_METHODS)}")
    return tuple(dict.fromkeys(names))


_METHOD_LABELS = {"vanilla": "gradient", "smoothgrad": "SmoothGrad", "guided": "guided BP", "deconvnet": "deconvnet",
                  "guided_gradcam": "guided Grad-CAM"}


class Saliency(Kind):
    """The ``saliency`` kind: per probe image, the input and one map per method for the true class (else the
    predicted one) (``cnnvis/saliency/input/probe_<i>``). The vanilla gradient comes from the shared pass;
    SmoothGrad and guided backpropagation run their own passes in :meth:`compute`, each guarded on its own (one
    failing method warns once and the others are shown)."""

    name, label, every = "saliency", "Saliency", 200
    log_in_background = True  # compute returns the maps; log draws them
    layer_role = None
    on_by_default = False

    def __init__(self, *, methods: str | Iterable[str] = "vanilla", every: int | None = None) -> None:
        super().__init__(every=every)
        self.methods = check_saliency_methods(methods)

    @classmethod
    def from_options(cls, options):
        return cls(methods=options.get("saliency_methods", "vanilla"))

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.cam_layer = info.cam_layer() if "guided_gradcam" in self.methods else None
        if any(m in _RELU_METHODS for m in self.methods):
            with preserved(info.net), torch.no_grad():
                x = info.probe.images[:1].to(device=model_device(info.net), dtype=model_dtype(info.net))
                check_guided(info.net, x, info.output_selector)

    def details(self) -> str:
        return super().details() + f"; methods: {', '.join(self.methods)}"

    def needs(self) -> Needs:
        return Needs(input_gradients="vanilla" in self.methods, scores=True)

    def _target(self, ctx: StepContext) -> str:
        return "true" if "true" in ctx.shared.targets else "pred"

    def compute(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        key = self._target(ctx)
        targets = ctx.shared.targets[key]

        selector = ctx.info.output_selector

        def gradients(method: str) -> torch.Tensor:
            if method == "vanilla":  # from the shared forward pass
                return ctx.shared.grads[key]["input"]
            return input_gradients(ctx.net, ctx.shared.inputs.detach(), targets, method, seed=ctx.info.seed,
                                   batch_size=len(targets), output_selector=selector)[0]

        def saliency_map(method: str) -> torch.Tensor:
            if method == "guided_gradcam":
                guided = maps["guided"] if "guided" in maps else saliency_from_gradients(gradients("guided"))
                return guided_gradcam(guided, cam(ctx.net, ctx.shared.inputs.detach(), self.cam_layer, targets,
                                                  "gradcam", output_selector=selector))
            return saliency_from_gradients(gradients(method))

        if "smoothgrad" in self.methods:
            logging.getLogger("cnnvis_tb").info("step %d: SmoothGrad over %d noisy copies", ctx.step,
                                                SMOOTHGRAD_SAMPLES * len(targets))
        maps: dict[str, torch.Tensor] = {}
        for method in self.methods:
            m = ctx.guarded(f"saliency ({method})", lambda m=method: saliency_map(m))
            if m is not None:
                maps[method] = m
        return maps

    def log(self, ctx: StepContext, out: Output, computed: dict[str, torch.Tensor]) -> None:
        if not computed:  # every method failed, and said so
            return
        key = self._target(ctx)
        targets = ctx.shared.targets[key].cpu()
        shown = ctx.shown
        columns = [(fit(colorize(computed[m].cpu(), "inferno"), PANEL, PANEL), m, _METHOD_LABELS[m])
                   for m in computed]
        inputs = fit(as_rgb(shown), PANEL, PANEL)
        for i in range(shown.shape[0]):
            target = f"{key}: {ctx.info.class_label(int(targets[i]))}"
            images = [inputs[i]] + [maps[i] for maps, _, _ in columns]
            lines = [["input", target]] + [[label, target] for _, _, label in columns]
            keys = ["input"] + [method for _, method, _ in columns]
            labels = ["input"] + [label for _, _, label in columns]
            strip, panels = captioned_strip(images, lines, keys, labels)
            out.image("input", tags.probe_view(i), to_uint8(strip), panels)
