"""DeepDream: what a layer amplifies in real images, by gradient ascent on the probe images themselves.

As in the DeepDream tutorials (TensorFlow's, after Mordvintsev et al.'s notebook), each probe image is the start
(not noise). The image is optimized in octaves: first a copy shrunk by ``octave_scale ** (octaves - 1)``, then
each octave ``octave_scale`` times larger, the last at the probe's own size. At each octave the image is the probe
at that size plus the detail dreamed so far, upscaled (the original notebook's scheme), so upscaling never blurs
the probe itself. Each step raises the RMS of the layer's activation, penalized by the pixels' distance from
mid-grey (L2) and by the image's gradients (the L1 norm of the Scharr-filter gradient magnitude, a total-variation
penalty); the image is shifted by a random roll first (jitter), so no pixel grid pattern is amplified. The
gradient of the objective is normalized per image, as the tutorial divides it by its standard deviation, so that
the step size means the same at every layer and at every stage of training.

The images live in pixel space ``p`` in ``[0, 1]`` per channel and reach the model in its input space
``x = lo + p * (hi - lo)``: with ``mean`` / ``std``, ``lo = -mean / std`` and ``hi = (1 - mean) / std``, so
``x = (p - mean) / std`` exactly; without, ``[lo, hi]`` is the probe's own range per channel. Clamping ``p`` to
``[0, 1]`` after each step keeps ``x`` in the valid pixel range.

Batched: every (probe image, layer) pair is one image of a batch of ``N * L``, one forward pass per step (cut
after the deepest layer), image ``k``'s objective read at its own layer. That is valid because the model runs in
eval mode, where no layer mixes the images of a batch. The jitter comes from our own ``torch.Generator`` (never
the global RNG), one shift per step for the whole batch, so an image's result does not depend on the batch
it is in. Gradients are taken with ``torch.autograd.grad`` with respect to the images only: the model's
parameters and their ``.grad`` are never touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.hooks import capture
from cnnvis_tb.kinds.actmax import BackgroundWork, SnapshotKind
from cnnvis_tb.kinds.base import ModelInfo, Output, StepContext, positive_int
from cnnvis_tb.layers import resolve_layer, unwrap_model
from cnnvis_tb.render import as_rgb, caption, fit, grid_boxes, make_grids, to_uint8
from cnnvis_tb.safety import model_device, model_dtype, preserved

_log = logging.getLogger("cnnvis_tb")

__all__ = [
    "deep_dream",
    "dream",
    "DreamConfig",
    "octave_sizes",
    "pixel_range",
    "layer_rms",
    "scharr_penalty",
    "DeepDream",
]

#: No octave is smaller than this many pixels a side (or the probe's own size, when that is smaller).
MIN_OCTAVE_SIDE = 8

# Scharr's derivative filter, scaled so that a ramp of slope 1 gives 1.
_SCHARR_X = torch.tensor([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]]) / 32.0


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"deepdream {name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DreamConfig:
    """Knobs of the optimization; every value is checked here, with what was expected and what was given.

    Attributes:
        octaves: image sizes optimized in turn, from the smallest up to the probe's size (1: the probe's size only).
        octave_scale: size ratio of two octaves in a row, in ``(1, 2]``; the tutorials use 1.3 (1.05-1.4 is usual).
        steps: gradient-ascent steps per octave.
        lr: step size, as a fraction of the pixel range, of the per-image normalized gradient (RMS 1).
        jitter: largest random roll in pixels at the probe's size (scaled down with the octave); None: a
            sixteenth of the shorter side, at least 1; 0: none.
        l2_weight: weight of the pixels' squared distance from mid-grey (per pixel, in pixel units).
        tv_weight: weight of the Scharr-filter gradient magnitude (per pixel, in pixel units).
        seed: seed of the jitter's own generator.
    """

    octaves: int = 3
    octave_scale: float = 1.3
    steps: int = 10
    lr: float = 0.04
    jitter: int | None = None
    l2_weight: float = 0.02
    tv_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        positive_int("deepdream octaves", self.octaves)
        positive_int("deepdream steps", self.steps)
        scale = _number("octave_scale", self.octave_scale)
        if not 1.0 < scale <= 2.0:
            raise ValueError(
                f"deepdream octave_scale must be > 1 and <= 2 (the size ratio of two octaves; the "
                f"tutorials use 1.3), got {self.octave_scale!r}"
            )
        if _number("lr", self.lr) <= 0:
            raise ValueError(
                f"deepdream lr must be > 0 (a fraction of the pixel range per step, e.g. 0.04), got {self.lr!r}"
            )
        for name in ("l2_weight", "tv_weight"):
            if _number(name, getattr(self, name)) < 0:
                raise ValueError(f"deepdream {name} must be >= 0, got {getattr(self, name)!r}")
        jitter = self.jitter
        if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0):
            raise ValueError(f"deepdream jitter must be None (automatic) or an int >= 0 (pixels), got {jitter!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"deepdream seed must be an int, got {self.seed!r}")


def octave_sizes(height: int, width: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """``(H, W)`` of each octave, smallest first, the last ``(height, width)``; no side below
    :data:`MIN_OCTAVE_SIDE` (or below the probe's own side, when that is smaller)."""
    floor_h, floor_w = min(height, MIN_OCTAVE_SIDE), min(width, MIN_OCTAVE_SIDE)
    return [
        (max(floor_h, round(height / scale**k)), max(floor_w, round(width / scale**k)))
        for k in range(octaves - 1, -1, -1)
    ]


def pixel_range(
    images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, each ``[1, C, 1, 1]``: the model-space values of pixels 0 and 1 of each channel.

    With ``mean`` / ``std`` (either may be None: 0 and 1) they are ``-mean / std`` and ``(1 - mean) / std``; without
    either, the range of ``images`` (``[N, C, H, W]``, as the model sees them) over the batch, per channel.
    """
    images = images.detach().float()
    c = images.shape[1]
    if mean is None and std is None:
        lo = images.amin(dim=(0, 2, 3)).view(1, c, 1, 1)
        hi = images.amax(dim=(0, 2, 3)).view(1, c, 1, 1)
        return lo, torch.maximum(hi, lo + 1e-6)
    m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(1, c, 1, 1)
    return (-m / s).to(images.device), ((1 - m) / s).to(images.device)


def scharr_penalty(images: torch.Tensor) -> torch.Tensor:
    """Per image, the sum over pixels and channels of the Scharr gradient magnitude of ``[K, C, H, W]``: ``[K]``.

    The L1 norm of the image gradient (a total-variation penalty) with Scharr's rotation-invariant 3x3 derivative
    filters; edges are replicated (at the border a one-sided difference, half as large).
    """
    c = images.shape[1]
    kx = _SCHARR_X.to(device=images.device, dtype=images.dtype)
    kernels = torch.stack([kx, kx.t()])[:, None].repeat(c, 1, 1, 1)  # [2C, 1, 3, 3]: x then y, per channel
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels, groups=c).unflatten(1, (c, 2))  # [K, C, 2, H, W]
    return grads.square().sum(dim=2).add(1e-6).sqrt().flatten(1).sum(dim=1)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _rms(activation: torch.Tensor) -> torch.Tensor:
    """RMS over everything but the batch dimension: ``[K, ...]`` → ``[K]``."""
    return activation.float().flatten(1).square().mean(dim=1).add(1e-12).sqrt()


def _copy_rows(layers: Sequence[str], n: int) -> dict[str, slice]:
    """The rows of the batch of ``len(layers) * n`` copies that each layer scores (layer-major)."""
    return {layer: slice(i * n, (i + 1) * n) for i, layer in enumerate(layers)}


def layer_rms(
    net: nn.Module, modules: Mapping[str, nn.Module], inputs: torch.Tensor, *, stop_after: str | None = None
) -> dict[str, torch.Tensor]:
    """RMS of each layer's activation per image of ``inputs`` (``[N, C, H, W]``, as the model sees them):
    ``{layer: [N]}``, without gradients. ``net`` must be in eval mode (``preserved``)."""
    with torch.no_grad(), capture(dict(modules), stop_after=stop_after) as acts:
        net(inputs.to(device=model_device(net), dtype=model_dtype(net)))
    missing = [name for name in modules if name not in acts]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the forward pass")
    return {name: _rms(acts[name]) for name in modules}


def dream(
    net: nn.Module,
    modules: Mapping[str, nn.Module],
    inputs: torch.Tensor,
    *,
    lo: torch.Tensor,
    hi: torch.Tensor,
    config: DreamConfig = DreamConfig(),
    stop_after: str | None = None,
    keep_octaves: bool = False,
) -> torch.Tensor:
    """Dream every image of ``inputs`` (``[N, C, H, W]``, as the model sees them) at every layer of ``modules``,
    as one batch. Returns ``[L, N, C, H, W]`` in pixel space ``[0, 1]`` (layer ``l`` in ``modules``' order), or with
    ``keep_octaves`` ``[octaves, L, N, C, H, W]``: the image after each octave, resized to the probe's size.

    ``net`` must already be in eval mode with state preserved by the caller (``preserved``); ``[lo, hi]`` is the
    model-space pixel range (:func:`pixel_range`); ``stop_after`` cuts each forward pass after that layer (the
    deepest of ``modules``).
    """
    device, dtype = model_device(net), model_dtype(net)
    layers = list(modules)
    n, c, h, w = inputs.shape
    lo = lo.to(device=device, dtype=torch.float32)
    span = hi.to(device=device, dtype=torch.float32) - lo
    probe = ((inputs.detach().to(device=device, dtype=torch.float32) - lo) / span).clamp(0, 1)
    probe = probe.repeat(len(layers), 1, 1, 1)  # [L * N, C, H, W]
    rows = _copy_rows(layers, n)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    sizes = octave_sizes(h, w, config.octaves, config.octave_scale)
    bases = [_resize(probe, size) for size in sizes]
    # As in actmax: oneDNN convolutions of a batch run faster on channels-last input on the CPU.
    layout = torch.channels_last if device.type == "cpu" and probe.shape[0] > 1 else torch.contiguous_format
    image = bases[0]
    kept = []
    for octave, size in enumerate(sizes):
        if octave:  # the probe at this size, plus the detail dreamed so far
            image = (bases[octave] + _resize(image - bases[octave - 1], size)).clamp(0, 1)
        full_jitter = config.jitter if config.jitter is not None else max(1, round(min(h, w) / 16))
        jitter = round(full_jitter * size[0] / h)
        for _ in range(config.steps):
            image = _ascent_step(
                net, modules, rows, image, lo, span, config, jitter, generator, stop_after, dtype, layout
            )
        if keep_octaves:
            kept.append(_resize(image, (h, w)).clamp(0, 1))
    result = torch.stack(kept) if keep_octaves else image
    return result.unflatten(-4, (len(layers), n)).detach()


def _ascent_step(net, modules, rows, image, lo, span, config, jitter, generator, stop_after, dtype, layout):
    """One step: roll by a random shift, raise each copy's layer RMS, penalize, clamp to the pixel range."""
    if jitter:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator, device=generator.device).tolist()
    else:
        dy = dx = 0
    p = image.detach().requires_grad_(True)
    x = (lo + torch.roll(p, shifts=(dy, dx), dims=(2, 3)) * span).to(dtype)
    with capture(dict(modules), for_grad=True, stop_after=stop_after) as acts:
        net(x.contiguous(memory_format=layout))
    missing = [name for name in modules if name not in acts]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the forward pass")
    objective = sum(_rms(acts[layer][rows[layer]]).sum() for layer in modules)
    (grad,) = torch.autograd.grad(objective, [p])
    # Per image RMS 1: the same step at every layer, however large its activations are.
    grad = grad / grad.flatten(1).square().mean(dim=1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
    q = image.detach().requires_grad_(True)
    penalty = config.l2_weight * (q - 0.5).square().sum() + config.tv_weight * scharr_penalty(q).sum()
    (penalty_grad,) = torch.autograd.grad(penalty, [q])
    with torch.no_grad():
        return (image + config.lr * (grad - penalty_grad)).clamp_(0, 1)


def _ordered(net: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor) -> list[str]:
    """The layers in the order the forward pass runs them (one image, no gradients); raises for a silent one."""
    with torch.no_grad(), capture(modules) as acts:
        net(inputs[:1].to(device=model_device(net), dtype=model_dtype(net)))
    missing = [name for name in modules if name not in acts]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass")
    return list(acts)


def deep_dream(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str | nn.Module] | str | nn.Module,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    octaves: int = DreamConfig.octaves,
    octave_scale: float = DreamConfig.octave_scale,
    steps: int = DreamConfig.steps,
    lr: float = DreamConfig.lr,
    jitter: int | None = None,
    l2_weight: float = DreamConfig.l2_weight,
    tv_weight: float = DreamConfig.tv_weight,
    seed: int = 0,
    keep_octaves: bool = False,
) -> dict[str, torch.Tensor]:
    """DeepDream of each image at each layer, all optimized as one batch.

    Args:
        model: the network (wrappers looked through); it runs in eval mode and is restored afterwards.
        images: ``[N, C, H, W]`` as the model sees them (normalized); the starting points.
        layers: modules or ``named_modules()`` names whose activation RMS is raised (each on its own copies).
        mean, std: the model's input normalization (the pixel range; see the module docs). Without them the pixel
            range is the range of ``images`` per channel.
        octaves, octave_scale, steps, lr, jitter, l2_weight, tv_weight, seed: see :class:`DreamConfig`.
        keep_octaves: also return the image after each octave (resized to the input size).

    Returns:
        ``{layer name: [N, C, H, W]}`` float in ``[0, 1]`` (pixel space, de-normalized), detached, on the model's
        device; with ``keep_octaves`` ``{layer name: [octaves, N, C, H, W]}``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W], got {shape}")
    net = unwrap_model(model)
    layers = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    modules = dict(resolve_layer(net, layer) for layer in layers)
    config = DreamConfig(
        octaves=octaves,
        octave_scale=octave_scale,
        steps=steps,
        lr=lr,
        jitter=jitter,
        l2_weight=l2_weight,
        tv_weight=tv_weight,
        seed=seed,
    )
    lo, hi = pixel_range(images, mean, std)
    with preserved(net):
        order = _ordered(net, modules, images)
        dreamed = dream(
            net, modules, images, lo=lo, hi=hi, config=config, stop_after=order[-1], keep_octaves=keep_octaves
        )
    if keep_octaves:
        return {name: dreamed[:, i].float() for i, name in enumerate(modules)}
    return {name: dreamed[i].float() for i, name in enumerate(modules)}


class DeepDream(SnapshotKind):
    """The ``deepdream`` kind: each probe image dreamed at each chosen convolution, logged as the probe beside its
    dream (``cnnvis/deepdream/<layer>/probe_<i>``), captioned with how much the dream raised the layer's RMS. All
    images and layers are one batched optimization (see the module docs). Not logged by default; costs about
    ``octaves * steps`` forward and backward passes over ``N * L`` images, cut after the deepest layer.

    Args:
        octaves, octave_scale, steps, lr, jitter, l2_weight, tv_weight: see :class:`DreamConfig` (checked here).
        background: optimize on a frozen snapshot of the model in a worker thread, as ``actmax_background`` does;
            results are logged at the snapshot's step and :meth:`close` waits for the worker.
        every, layers: as for every kind; the automatic layer is the middle one of three convolutions spread
            over depth (``layers`` must name convolutions).
    """

    name, label, every = "deepdream", "DeepDream", 1000
    #: On the random weights of step 0 it shows nothing learned, and it is among the costliest kinds.
    at_step_zero = False
    layer_role = "conv"
    on_by_default = False
    #: compute optimizes (or hands a snapshot to the kind's own worker); log only draws the images it returned.
    log_in_background = True

    def __init__(
        self,
        *,
        octaves: int = DreamConfig.octaves,
        octave_scale: float = DreamConfig.octave_scale,
        steps: int = DreamConfig.steps,
        lr: float = DreamConfig.lr,
        jitter: int | None = None,
        l2_weight: float = DreamConfig.l2_weight,
        tv_weight: float = DreamConfig.tv_weight,
        background: bool = False,
        every: int | None = None,
        layers=None,
    ) -> None:
        super().__init__(every=every, layers=layers)
        self.config = DreamConfig(
            octaves=octaves,
            octave_scale=octave_scale,
            steps=steps,
            lr=lr,
            jitter=jitter,
            l2_weight=l2_weight,
            tv_weight=tv_weight,
        )
        if not isinstance(background, bool):
            raise TypeError(f"deepdream background must be True or False, got {background!r}")
        self.background = background
        self._worker = BackgroundWork(self, "DeepDream")

    def default_layers(self, info: ModelInfo) -> list[str]:
        spread = info.spread_layers(3)
        return [spread[len(spread) // 2]]

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.config = replace(self.config, seed=info.seed)
        shapes = info.layer_shapes
        for layer in self.layers:
            shape = shapes.get(layer)
            if shape is None or len(shape) != 4:
                raise ValueError(
                    f"deepdream layer {layer!r} must run on the probe and output a spatial map "
                    f"[N, C, H, W], got {shape}"
                )

    def details(self) -> str:
        c = self.config
        return super().details() + f"; {c.octaves} octaves × {c.steps} steps, octave scale {c.octave_scale:g}"

    # ------------------------------------------------------------------ a logging step
    def compute(self, ctx: StepContext) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        c = self.config
        _log.info(
            "step %d: DeepDream of %d probe images at %d layers, %d octaves × %d steps%s",
            ctx.step,
            ctx.inputs.shape[0],
            len(self.layers),
            c.octaves,
            c.steps,
            " (in the background)" if self.background else "",
        )
        if not self.background or not self._worker.may_run(ctx):
            return self._dreams(ctx.net, ctx.inputs)
        inputs = ctx.inputs.detach().clone()
        self._worker.submit(ctx, lambda net: self._dreams(net, inputs), self._write)
        return None


    # ------------------------------------------------------------------ the work
    def _dreams(self, net: nn.Module, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """``{layer: (probe [N, C, H, W], dream [N, C, H, W], RMS gain [N])}``, pixels in ``[0, 1]`` on the CPU."""
        present = {name: m for name, m in net.named_modules() if name in self.layers}
        modules = {name: present[name] for name in self.layers if name in present}
        if not modules:
            next(self.each_layer(net), None)  # raises, naming the missing layers
        order = {t.name: t.order for t in self.info.traces}
        deepest = max(modules, key=lambda name: order.get(name, -1))
        lo, hi = pixel_range(self.info.probe.images, self.info.mean, self.info.std)
        dreamed = dream(net, modules, inputs, lo=lo, hi=hi, config=self.config, stop_after=deepest)
        n = inputs.shape[0]
        lo, span = lo.to(dreamed.device), (hi - lo).to(dreamed.device)
        # One pass scores every dream at its own layer, another the probe at every layer.
        dream_rms = layer_rms(net, modules, lo + dreamed.flatten(0, 1) * span, stop_after=deepest)
        probe_rms = layer_rms(net, modules, inputs, stop_after=deepest)
        probe = ((inputs.detach().float().to(lo.device) - lo) / span).clamp(0, 1).cpu()
        rows = _copy_rows(list(modules), n)
        return {
            name: (probe, dreamed[i].float().cpu(), (dream_rms[name][rows[name]] / probe_rms[name]).float().cpu())
            for i, name in enumerate(modules)
        }

    def _write(self, out: Output, per_layer: dict[str, tuple[torch.Tensor, ...]]) -> None:
        for layer, (probe, dreamed, gain) in per_layer.items():
            if not torch.isfinite(dreamed).all():
                self.info.warn_once(
                    f"nonfinite-deepdream-{layer}",
                    f"DeepDream images of {layer!r} hold NaN or inf "
                    "values (the model's weights or activations are not finite)",
                )
            tiles = fit(as_rgb(torch.cat([probe, dreamed])), 64, 128)  # [2N, 3, h, w]
            pairs = torch.stack([tiles[: len(probe)], tiles[len(probe) :]], dim=1)  # [N, 2, 3, h, w]
            boxes = grid_boxes(2, 2, tuple(tiles.shape[-2:]), padding=2)
            for i, (grid, g) in enumerate(zip(make_grids(pairs, ncol=2, padding=2), gain.tolist(), strict=True)):
                panels = [{"key": "probe", "label": "probe image", "box": boxes[0], "text": ["probe image"]},
                          {"key": "dream", "label": "dream", "box": boxes[1],
                           "text": [f"{layer} RMS ×{g:.1f}"]}]
                out.image(layer, tags.probe_view(i), to_uint8(caption(grid, [f"RMS ×{g:.1f}"])), panels)
