"""Grad-CAM and Grad-CAM++: class-discriminative heatmaps from a layer's activations and gradients.

Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activation only, so parameters'
``.grad`` are never touched, and each image gets its own target class. Maps are computed in float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.hooks import OWN, capture, first_tensor
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext, positive_int
from cnnvis_tb.kinds.cam_methods import METHODS, CamInputs, Scorer, bias_layers, check_methods, linear_head
from cnnvis_tb.kinds.cam_metrics import (
    DELETION_STEPS,
    blur,
    deletion_insertion,
    energy,
    entropy,
    perturbation_counts,
    pointing,
    rank_vectors,
    regions,
    spearman_of_ranks,
    top_iou,
)
from cnnvis_tb.layers import resolve_layer, select_output, unwrap_model
from cnnvis_tb.render import as_rgb, captioned_strips, fit, overlay_heatmap, to_uint8
from cnnvis_tb.safety import FrozenCopies, model_device, model_dtype, preserved

__all__ = ["cam", "grad_cam", "cam_from_gradients", "normalize_maps", "resolve_targets", "target_scorer", "GradCam",
           "CAM_METRICS", "check_cam_metrics"]

_EPS = 1e-7
_log = logging.getLogger("cnnvis_tb")


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
        if x.is_inference():  # made under torch.inference_mode(): a normal tensor can be saved for backward
            x = x.clone()
        biases = bias_layers(net) if spec.full_gradients else {}
        if spec.full_gradients:
            x = x.clone().requires_grad_(True)
        hooked = {name: module, **{n: m for n, (m, _) in biases.items()}}
        grad_on = spec.gradients or spec.full_gradients
        with capture(hooked, for_grad=True, own=frozenset(biases)) as acts, torch.set_grad_enabled(grad_on):
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
            used = [n for n in biases if n + OWN in acts]  # FullGrad: the bias layers' own outputs
            wrt = [acts[name]] + [acts[n + OWN] for n in used] + ([x] if spec.full_gradients else [])
            grads = torch.autograd.grad(base.sum(), wrt, allow_unused=True)
            inputs.grads = _zero_if_none(grads[0], acts[name]).float()
            if spec.full_gradients:
                inputs.input_grads = _zero_if_none(grads[-1], x)
                inputs.bias_grads = {n: (biases[n][1], _zero_if_none(g, acts[n + OWN]).detach())
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


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` non-negative maps resized bilinearly to the input's ``size`` (float32), not rescaled."""
    return F.interpolate(maps.float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)


@dataclass
class CamStep:
    """What :meth:`GradCam.compute` hands to :meth:`GradCam.log`, keyed ``(layer, method, target)``: the raw maps
    ``[N, h, w]`` (ReLU applied), the same resized to the input once for every use, the confidence measures and the
    per-image deletion and insertion AUCs (the metrics that need the model)."""

    raw: dict[tuple[str, str, str], torch.Tensor]
    full: dict[tuple[str, str, str], torch.Tensor]
    confidence: dict[tuple[str, str, str], tuple[float, float]]
    deletion: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: A frozen copy of the model on which :meth:`GradCam.log` runs the metrics that need the model (confidence,
    #: deletion / insertion) when it runs on the asynchronous-logging worker; None when compute ran them.
    snapshot: nn.Module | None = None
    #: The maps are left to :meth:`GradCam.log` (on the asynchronous worker): ``raw`` and ``full`` are empty.
    deferred: bool = False


#: Colour scales of the logged maps: each map min-max scaled, or one scale per probe image, method and target kept
#: over the run (the largest value seen so far), so a map that fades or spreads over training shows as such.
CAM_SCALES = ("image", "run")
#: Perturbed images per logging step above which the constructor warns about Score-/Ablation-CAM's cost.
COSTLY_IMAGES = 4096
#: Values of the ``cam_metrics`` option besides ``True`` (= ``"default"``) and ``False`` (no metric). ``"cheap"``: only
#: the metrics computed from the maps alone (pointing, energy, IoU, entropy, stability, agreement), for every method
#: and target. ``"default"`` adds the ones that run the model again: the confidence drop / increase (one probe
#: forward per method and distinct target set) for every method and target, and the deletion / insertion curves
#: (``2·(steps − 1)`` perturbed images per map, the costliest) for the first method's map of the predicted class.
#: ``"all"``: deletion / insertion for every method and target too.
CAM_METRICS = ("default", "all", "cheap")
#: Inputs up to this many pixels (64 × 64) get deletion / insertion at every Grad-CAM logging step by default.
SMALL_INPUT_PIXELS = 64 * 64
#: The default ``deletion_every`` for larger inputs. Their perturbed images (``2·steps`` per probe image) are forwards
#: of the whole model, whose cost grows with the pixels faster than the logging step's other work: on ResNet-18 at
#: 224 px on a CPU they are about three quarters of a default logging step at a Grad-CAM step where they run, and at
#: every 4th such step about 40 % of that logging work over the run; at 32 px, where they run at every step, they are
#: an eighth to a sixth of it (``bench/bench_metrics.py`` measures both; the README's metrics section has the figures).
LARGE_INPUT_DELETION_EVERY = 4
#: Seconds of deletion / insertion at one logging step above which the kind warns (once) about their cost.
SLOW_DELETION_SECONDS = 5.0


def check_cam_metrics(value: object) -> str | bool:
    """``"default"``, ``"all"``, ``"cheap"`` or ``False`` for a ``cam_metrics`` option (``True`` means
    ``"default"``); else ``ValueError``."""
    if value is True or value is False:
        return "default" if value else False
    if isinstance(value, str) and value in CAM_METRICS:
        return value
    raise ValueError("cam_metrics must be True or 'default' (every metric; deletion / insertion only for the first "
                     "method's map of the predicted class), 'all' (deletion / insertion for every method and target "
                     "too), 'cheap' (only the metrics computed from the maps alone: no deletion / insertion, no "
                     f"confidence drop / increase, which run the model again) or False (no metric), got {value!r}")


class GradCam(Kind):
    """The ``gradcam`` kind: per CAM layer and probe image, a strip of the input and one overlay per CAM method and
    target (the true class, with probe labels, and the predicted class) (``cnnvis/gradcam/<layer>/probe_<i>``).

    Every gradient method comes from the one shared forward and backward per target set; Score-CAM and Ablation-CAM
    run their perturbed forwards in :meth:`compute`, at most ``batch_size`` images per pass; a target set equal to an
    earlier one reuses its maps.

    Args:
        methods: CAM methods shown (names of :data:`cnnvis_tb.kinds.cam_methods.METHODS`).
        batch_size: perturbed images per forward pass of Score-CAM / Ablation-CAM (the memory cap).
        scale: ``"image"`` (each map min-max scaled) or ``"run"`` (see :data:`CAM_SCALES`).
        metrics: explanation-quality scalars: ``True`` / ``"default"``, ``"all"``, ``"cheap"`` or ``False`` (see
            :data:`CAM_METRICS`).
        deletion_steps: perturbation steps of the deletion / insertion curves
            (:func:`cnnvis_tb.kinds.cam_metrics.deletion_insertion`).
        deletion_every: run deletion / insertion at the logging steps that are multiples of ``deletion_every``
            logging intervals (step 0 included), and at a ``log_now`` off the kind's schedule; None (the default):
            1 (every logging step) when the probe images have at most :data:`SMALL_INPUT_PIXELS` pixels, else
            :data:`LARGE_INPUT_DELETION_EVERY` (see there why).
        background_metrics: with asynchronous logging, run the metrics that need the model (confidence, deletion /
            insertion) on the worker, on a frozen copy of the model taken at the logging step (one more copy of
            the parameters and buffers while they run), so the training thread pays only for the copy. False:
            on the training thread, on the model itself (as without asynchronous logging).
    """

    name, label, every = "gradcam", "Grad-CAM", 200
    #: log calls no model and reads no parameter (maps and the kind's own state; the metrics that run the model ran
    #: in compute, or run in log on the frozen copy compute made), so it may run on the async worker.
    log_in_background = True
    follows_layer_list = False  # a plain layers=[...] list names layers to look inside; Grad-CAM keeps its own

    def __init__(self, *, methods=("gradcam", "gradcam++"), batch_size: int = 64, scale: str = "image",
                 metrics: bool | str = True, deletion_steps: int = DELETION_STEPS, deletion_every: int | None = None,
                 background_metrics: bool = True, every: int | None = None, layers=None) -> None:
        super().__init__(every=every, layers=layers)
        self.methods = check_methods(methods)
        self.batch_size = positive_int("cam_batch_size", batch_size)
        if scale not in CAM_SCALES:
            raise ValueError(f"cam_scale must be one of {CAM_SCALES}, got {scale!r}")
        self.scale = scale
        self.metrics = check_cam_metrics(metrics)
        self.deletion_steps = positive_int("deletion_steps", deletion_steps)
        self.deletion_every_given = None if deletion_every is None else positive_int("deletion_every", deletion_every)
        self.deletion_every = self.deletion_every_given or 1  # set from the probe's size in setup when not given
        self.background_metrics = bool(background_metrics)
        self._copies = FrozenCopies()  # the frozen copy of background_metrics, reused from step to step
        self._previous_ranks: dict[tuple[str, str, str], torch.Tensor] = {}  # each map set's rank_vectors
        self._run_max: dict[tuple[str, str, str], torch.Tensor] = {}
        self._heads: dict[str, torch.Tensor] = {}

    @classmethod
    def from_options(cls, options):
        return cls(methods=options.get("cam_methods", ("gradcam", "gradcam++")),
                   batch_size=options.get("cam_batch_size", 64), scale=options.get("cam_scale", "image"),
                   metrics=options.get("cam_metrics", True))

    def default_layers(self, info: ModelInfo) -> list[str]:
        return [info.cam_layer()]

    @property
    def _specs(self):
        return [METHODS[m] for m in self.methods]

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if self.deletion_every_given is None:
            pixels = info.probe.images.shape[-2] * info.probe.images.shape[-1]
            self.deletion_every = 1 if pixels <= SMALL_INPUT_PIXELS else LARGE_INPUT_DELETION_EVERY
        self._bias = bias_layers(info.net) if any(s.full_gradients for s in self._specs) else {}
        shapes = info.layer_shapes
        for layer in self.layers:
            shape = shapes.get(layer)
            if shape is None or len(shape) != 4:
                raise ValueError(f"CAM layer {layer!r} must output a spatial map [N, C, H, W], got {shape}; name a "
                                 "convolutional block with layers={'gradcam': [...]}")
        if "cam" in self.methods:
            with preserved(info.net), torch.no_grad():
                x = info.probe.images.to(device=model_device(info.net), dtype=model_dtype(info.net))
                modules = dict(info.net.named_modules())
                for layer in self.layers:
                    self._heads[layer] = linear_head(info.net, layer, modules[layer], x, info.output_selector).weight
        costly = [s.label for s in self._specs if s.forwards]
        if costly:
            targets = 2 if info.probe.labels is not None else 1
            images = sum(len(info.probe) * shapes[layer][1] for layer in self.layers) * targets * len(costly)
            passes = -(-images // self.batch_size)
            if images > COSTLY_IMAGES:
                info.warn_once("cam-cost", f"{' and '.join(costly)} on layers {self.layers} cost up to {images:,} "
                               f"perturbed images ({passes:,} forward passes of up to {self.batch_size}) per logging "
                               "step; choose a layer with fewer channels, a smaller probe or a larger every['gradcam']")

    def details(self) -> str:
        when = "" if self.deletion_every == 1 else f", every {self.deletion_every * self.every} steps"
        metrics = {"default": f"default (deletion / insertion of {METHODS[self.methods[0]].label} · pred in "
                              f"{self.deletion_steps} steps{when})",
                   "all": f"all (deletion / insertion in {self.deletion_steps} steps{when})", "cheap": "cheap",
                   False: "off"}[self.metrics]
        return super().details() + f"; methods: {', '.join(self.methods)}; scale: {self.scale}; metrics: {metrics}"

    def needs(self) -> Needs:
        specs = self._specs
        layers = tuple(self.layers)
        if any(s.full_gradients for s in specs):
            return Needs(graph_activations=layers, own_gradients=tuple(self._bias), input_gradients=True)
        if any(s.gradients for s in specs):
            return Needs(graph_activations=layers)
        return Needs(activations=layers, scores=True)

    def _deferrable(self) -> bool:
        """Whether every method's maps come from the probe pass's detached activations and gradients alone (no
        forward of the model, no read of its parameters), so they may be computed on the asynchronous worker."""
        return all(s.gradients and not (s.full_gradients or s.forwards or s.head) for s in self._specs)

    def compute(self, ctx: StepContext) -> CamStep:
        """Every method's maps for every layer and target, and the metrics that need the model; with asynchronous
        logging, what can wait is left to :meth:`log` on the worker: the gradient methods' maps (from the probe
        pass's detached activations and gradients) and the metrics that run the model (on a frozen copy)."""
        computed = CamStep({}, {}, {})
        model_metrics = self.metrics in ("default", "all")
        if (model_metrics and self.background_metrics and ctx.info.in_background
                and ctx.info.may_run_elsewhere(ctx.net, "the CAM metrics that run the model")):
            try:
                computed.snapshot = self._copies.take(ctx.net)
            except Exception as e:
                if ctx.info.strict:
                    raise
                ctx.warn_once("gradcam-copy", f"the model could not be copied ({type(e).__name__}: {e}), so the "
                              "CAM metrics that run it run on the training thread; "
                              "GradCam(background_metrics=False) does so without trying")
        try:
            if ctx.info.in_background and self._deferrable() and (computed.snapshot is not None or not model_metrics):
                for layer, _ in self.each_layer(ctx.net):  # a layer that did not run fails at its own step, ...
                    self._activations(ctx, layer)
                    for key in ctx.shared.targets:  # ... as does one the class scores do not depend on
                        self._gradients(ctx, key, layer)
                computed.deferred = True
                return computed
            computed.raw, computed.full = self._maps(ctx)
        except BaseException:
            if computed.snapshot is not None:  # this step's log will not run: the copy is free again
                self._copies.give_back(computed.snapshot)
            raise
        if model_metrics and computed.snapshot is None:
            self._model_metrics(ctx, ctx.net, computed)
        return computed

    @staticmethod
    def _activations(ctx: StepContext, layer: str) -> torch.Tensor:
        shared = ctx.shared
        acts = shared.graph_activations.get(layer, shared.activations.get(layer))
        if acts is None:
            raise RuntimeError(f"layer {layer!r} did not run in the forward pass")
        return acts

    def _maps(self, ctx: StepContext) -> tuple[dict, dict]:
        """Every method's raw maps ``[N, h, w]`` and the same resized to the input, keyed ``(layer, method,
        target)``; a target set equal to an earlier one shares its maps."""
        shared = ctx.shared
        maps: dict[tuple[str, str, str], torch.Tensor] = {}
        keys = [k for k in ("true", "pred") if k in shared.targets]
        costly = [s.label for s in self._specs if s.forwards]
        if costly:
            _log.info("step %d: %s on %s (one perturbed image per channel, probe image and target)", ctx.step,
                      " and ".join(costly), ", ".join(self.layers))
        for layer, module in self.each_layer(ctx.net):
            acts = self._activations(ctx, layer)
            for i, key in enumerate(keys):
                classes = shared.targets[key]
                same = next((k for k in keys[:i] if torch.equal(shared.targets[k], classes)), None)
                for spec in self._specs:
                    if same is not None:
                        maps[(layer, spec.name, key)] = maps[(layer, spec.name, same)]
                        continue
                    inputs = self._inputs(ctx, layer, module, acts, key, classes, spec)
                    maps[(layer, spec.name, key)] = spec.fn(inputs).clamp_min(0)
        size = tuple(shared.inputs.shape[-2:])
        resized: dict[int, torch.Tensor] = {}  # equal target sets share their maps, and so their resized maps
        return maps, {k: resized.setdefault(id(raw), _resize(raw, size)) for k, raw in maps.items()}

    def _model_metrics(self, ctx: StepContext, net: nn.Module, computed: CamStep) -> None:
        """The metrics that run ``net`` (the model, or its frozen copy on the worker), into ``computed``; a failure
        warns once and leaves them out (the pictures and the other metrics still log)."""
        def run() -> None:
            computed.confidence = self._confidence_changes(ctx, net, computed.full)
            if self.deletion_due(ctx.step):
                computed.deletion = self._deletion_insertion(ctx, net, computed.full)

        ctx.guarded("gradcam metrics", run)

    def deletion_due(self, step: int) -> bool:
        """Whether deletion / insertion run at ``step``: at multiples of ``deletion_every`` logging intervals, and
        at a step off the kind's schedule (a ``log_now`` asked for it)."""
        return step % (self.deletion_every * self.every) == 0 or step % self.every != 0

    def _deletion_insertion(self, ctx, net, full) -> dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]]:
        """Per-image deletion and insertion AUCs ``([N], [N])`` of the map sets chosen by ``metrics`` (see
        :func:`cnnvis_tb.kinds.cam_metrics.deletion_insertion`: baseline 0 in the model's input space, insertion from
        the blurred probe image), all map sets' perturbed images in one stream of no-grad forwards of at most
        ``batch_size`` images. An image whose class is the same for two targets (its prediction is right) is
        perturbed once: its map is the same for both."""
        shared = ctx.shared
        x = shared.inputs.detach()
        n = x.shape[0]
        selector = ctx.info.output_selector
        maps, owners, classes = [], [], []
        slots: dict[tuple[str, str, str], torch.Tensor] = {}  # per map set: image i -> row of the results
        rows = 0
        if self.metrics != "all":  # the default: the first method's map of the predicted class
            full = {k: v for k, v in full.items() if k[1] == self.methods[0] and k[2] == "pred"}
        for which, full_maps in full.items():
            layer, method, key = which
            cls = shared.targets[key].to(x.device)
            slot = torch.full((n,), -1, dtype=torch.long)
            for earlier, earlier_slot in slots.items():
                if earlier[:2] != (layer, method):
                    continue
                same = torch.ones(n, dtype=torch.bool) if full[earlier] is full_maps else (
                    shared.targets[earlier[2]].to(x.device) == cls).cpu()
                slot = torch.where((slot < 0) & same, earlier_slot, slot)
            new = torch.nonzero(slot < 0)[:, 0]
            slot[new] = torch.arange(rows, rows + new.numel())
            rows += new.numel()
            slots[which] = slot
            maps.append(full_maps[new.to(full_maps.device)].to(x.device))
            owners.append(new.to(x.device))
            classes.append(cls[new.to(x.device)])

        def predict(batch: torch.Tensor) -> torch.Tensor:
            return select_output(net(batch), selector).float().softmax(dim=1)

        started = time.perf_counter()
        deletion, insertion = deletion_insertion(
            predict, x, torch.cat(maps), torch.cat(classes), owner=torch.cat(owners), steps=self.deletion_steps,
            baseline=0.0, start=blur(x), batch_size=self.batch_size,
            image_probs=shared.scores.detach().float().softmax(dim=1))
        seconds = time.perf_counter() - started
        inner = len(perturbation_counts(x.shape[-2] * x.shape[-1], self.deletion_steps)) - 2
        images = 2 * n + 2 * inner * rows
        _log.debug("step %d: deletion / insertion: %d perturbed images in %.2f s", ctx.step, images, seconds)
        if seconds > SLOW_DELETION_SECONDS:
            ctx.warn_once("deletion-cost", f"deletion / insertion took {seconds:.1f} s at step {ctx.step} ({images:,} "
                          f"perturbed images in {-(-images // self.batch_size):,} forward passes); cam_metrics='cheap' "
                          "leaves them out (and the confidence drop / increase); GradCam(deletion_steps=...) with "
                          "fewer steps, GradCam(deletion_every=...) or a larger every['gradcam'] makes them cheaper"
                          + ("" if self.metrics != "all" else "; cam_metrics=True runs them for the first method's "
                             "map of the predicted class only"))
        return {which: (deletion[slot], insertion[slot]) for which, slot in slots.items()}

    @torch.no_grad()
    def _confidence_changes(self, ctx, net, full) -> dict[tuple[str, str, str], tuple[float, float]]:
        """Average drop and increase in confidence (Chattopadhay et al.): the target's softmax probability on the
        probe image times its map (upsampled, min-max scaled; in the model's input space, so masked-out pixels
        become 0, the dataset mean under mean/std normalization) against the probability on the image itself.
        One no-grad forward of the probe per method and distinct target set."""
        shared = ctx.shared
        x = shared.inputs.detach()
        probs = shared.scores.detach().float().softmax(dim=1)
        selector = ctx.info.output_selector
        out: dict[tuple[str, str, str], tuple[float, float]] = {}
        done: dict[int, tuple[float, float]] = {}
        for (layer, method, key), maps in full.items():
            if id(maps) in done:  # a target set equal to an earlier one: the same maps, the same answer
                out[(layer, method, key)] = done[id(maps)]
                continue
            mask = normalize_maps(maps).to(device=x.device, dtype=x.dtype)
            masked = select_output(net(x * mask[:, None]), selector).float().softmax(dim=1)
            t = shared.targets[key][:, None]
            y, o = probs.gather(1, t)[:, 0], masked.gather(1, t)[:, 0]
            drop = ((y - o).clamp_min(0) / y.clamp_min(1e-12)).mean().item()
            increase = (o > y).float().mean().item()
            done[id(maps)] = out[(layer, method, key)] = (drop, increase)
        return out

    @staticmethod
    def _gradients(ctx: StepContext, key: str, layer: str) -> torch.Tensor:
        g = ctx.shared.grads.get(key, {}).get(layer)
        if g is None:
            raise RuntimeError(f"the class scores do not depend on layer {layer!r}")
        return g

    def _inputs(self, ctx, layer, module, acts, key, classes, spec) -> CamInputs:
        shared = ctx.shared
        grads = shared.grads.get(key, {})
        inputs = CamInputs(acts=acts.detach().float(), net=ctx.net, layer=layer, module=module,
                           images=shared.inputs.detach(), batch_size=self.batch_size)
        if spec.gradients or spec.full_gradients:
            inputs.grads = self._gradients(ctx, key, layer).detach().float()
        if spec.full_gradients:
            inputs.input_grads = grads["input"].detach()
            inputs.bias_grads = {n: (b, grads[n + OWN].detach()) for n, (_, b) in self._bias.items()
                                 if grads.get(n + OWN) is not None}
        if spec.forwards:
            selector = ctx.info.output_selector
            inputs.scorer = lambda out, owner: select_output(out, selector).gather(1, classes[owner][:, None])[:, 0]
            inputs.base_scores = shared.scores.detach().gather(1, classes[:, None])[:, 0]
        if spec.head:
            inputs.head_weights = self._heads[layer].detach().float()[classes]
        return inputs

    def log(self, ctx: StepContext, out: Output, computed: CamStep) -> None:
        net, computed.snapshot = computed.snapshot, None
        try:
            if computed.deferred:  # on the worker: the gradient methods' maps from the pass's detached tensors
                computed.raw, computed.full = self._maps(ctx)
                computed.deferred = False
            if net is not None:  # on the worker: the metrics that need the model, on its frozen copy
                self._model_metrics(ctx, net, computed)
        finally:
            if net is not None:
                self._copies.give_back(net)  # refreshed in place at the next logging step
        self._draw(ctx, out, computed)

    def _draw(self, ctx: StepContext, out: Output, computed: CamStep) -> None:
        shared, shown, label_of = ctx.shared, ctx.shown, ctx.info.class_label
        size = tuple(shown.shape[-2:])
        probs = shared.probabilities
        targets = {k: v.cpu() for k, v in shared.targets.items()}
        order = [k for k in ("true", "pred") if k in targets]
        inputs = fit(as_rgb(shown), PANEL, PANEL)
        for layer in dict.fromkeys(layer for layer, _, _ in computed.raw):
            columns = []  # (overlays [N, 3, panel, panel], method, method label, target key), all images at once
            for spec in self._specs:
                for key in order:
                    maps = self._scaled((layer, spec.name, key), computed).cpu()
                    columns.append((fit(overlay_heatmap(shown, maps), PANEL, PANEL), spec.name, spec.label, key))
            keys = ["input"] + [f"{method}/{key}" for _, method, _, key in columns]
            labels = ["input"] + [f"{label} · {key}" for _, _, label, key in columns]
            lines = []
            for i in range(shown.shape[0]):
                true = f"true: {label_of(int(targets['true'][i]))}" if "true" in targets else "label unknown"
                lines.append([["input", true]] + [
                    [label, f"{key}: {label_of(int(targets[key][i]))} · {probs[i, int(targets[key][i])]:.0%}"]
                    for _, _, label, key in columns])
            strips, records = captioned_strips([inputs] + [overlays for overlays, *_ in columns], lines, keys, labels)
            for i, (strip, panels) in enumerate(zip(to_uint8(strips), records, strict=True)):
                out.image(layer, tags.probe_view(i), strip, panels)
            if self.metrics:
                self._log_metrics(ctx, out, layer, order, computed, size)
        for _ in self.each_layer(ctx.net):  # after the layers still there have logged: name the missing ones
            pass

    def _log_metrics(self, ctx, out, layer, order, computed, size) -> None:
        """Explanation quality per method and target, averaged over the probe, under
        ``cnnvis/metrics/gradcam/<layer>/<metric>/<method>/<target>``, and the pointing game also per probe image
        (``.../pointing/<method>/<target>/probe_<i>``); see :mod:`cnnvis_tb.kinds.cam_metrics` and
        :func:`cnnvis_tb.tags.cam_metric_name`."""
        region = regions(ctx.info.probe.boxes, ctx.info.probe.masks, size)
        ranked: dict[int, torch.Tensor] = {}
        for spec in self._specs:
            for key in order:
                which = (layer, spec.name, key)
                full = computed.full[which].cpu()

                def name(metric: str, probe: int | None = None, method=spec.name, target=key) -> str:
                    return tags.cam_metric_name(metric, method, target, probe)

                if region is not None:
                    hits = pointing(full, region)
                    out.scalar(layer, name("pointing"), hits.mean().item())
                    for i, hit in enumerate(hits.tolist()):
                        out.scalar(layer, name("pointing", i), hit)
                    out.scalar(layer, name("energy"), energy(full, region).mean().item())
                    out.scalar(layer, name("iou"), top_iou(full, region).mean().item())
                out.scalar(layer, name("entropy"), entropy(full).mean().item())
                drop, increase = computed.confidence.get(which, (None, None))
                if drop is not None:
                    out.scalar(layer, name("confidence_drop"), drop)
                    out.scalar(layer, name("confidence_increase"), increase)
                if which in computed.deletion:
                    deletion, insertion = computed.deletion[which]
                    out.scalar(layer, name("deletion"), deletion.mean().item())
                    out.scalar(layer, name("insertion"), insertion.mean().item())
                ranks = ranked.get(id(computed.full[which]))  # equal target sets share their maps, so their ranks
                if ranks is None:
                    ranks = ranked[id(computed.full[which])] = rank_vectors(full)
                previous = self._previous_ranks.get(which)
                if previous is not None and previous.shape == ranks.shape:
                    out.scalar(layer, name("stability"), spearman_of_ranks(ranks, previous).mean().item())
                self._previous_ranks[which] = ranks
        if len(self._specs) > 1:  # do the methods agree? mean Spearman correlation over pairs of methods
            for key in order:
                ranks = [self._previous_ranks[(layer, spec.name, key)] for spec in self._specs]  # this step's
                pairs = [spearman_of_ranks(a, b).mean() for i, a in enumerate(ranks) for b in ranks[i + 1:]]
                out.scalar(layer, tags.cam_agreement_name(key), torch.stack(pairs).mean().item())

    def close(self) -> None:
        self._copies.clear()

    def _scaled(self, which: tuple[str, str, str], computed: CamStep) -> torch.Tensor:
        """One map set ``[N, H, W]`` in ``[0, 1]`` on the kind's colour scale (see :data:`CAM_SCALES`)."""
        full = computed.full[which]
        if self.scale == "image":
            return normalize_maps(full)
        peak = computed.raw[which].detach().float().amax(dim=(1, 2)).cpu()
        seen = self._run_max.get(which)
        seen = peak if seen is None or seen.shape != peak.shape else torch.maximum(seen, peak)
        self._run_max[which] = seen
        scale = torch.where(seen > _EPS, 1.0 / seen.clamp_min(_EPS), 0.0).to(full.device)
        return (full * scale[:, None, None]).clamp(0, 1)
