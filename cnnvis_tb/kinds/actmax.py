"""Activation maximization: images synthesized by gradient ascent to excite chosen channels.

All channels (of one or several layers) are optimized together as ONE batch: image ``k`` of the batch
maximizes channel ``c_k`` of layer ``l_k``. That is valid because the model runs in eval mode, where no layer
mixes the images of a batch. The images live in ``[0, 1]`` pixel space (sigmoid of a free parameter, in
Fourier space with 1/f scaling and colour decorrelation by default) and are normalized with the model's
``mean``/``std`` before the forward pass. Each step applies one random affine warp to the whole batch (shift,
scale, small rotation over a padded border, magnitudes scaled to the input size; see :class:`ActMaxConfig`) from
our own ``torch.Generator``, never the global RNG, and penalizes total variation and L2 distance from grey.
With ``diversity=d > 1`` every channel gets ``d`` images in the same batch, pushed apart by the cosine similarity
of the Gram matrices of the layer's activation (the diversity objective of the feature-visualization literature).
Gradients are taken with ``torch.autograd.grad`` with respect to the image parameter only, so the model's
parameters and their ``.grad`` are never touched.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb.hooks import capture
from cnnvis_tb.kinds.base import Kind, ModelInfo, Output, StepContext, positive_int
from cnnvis_tb.layers import resolve_layer, unwrap_model
from cnnvis_tb.render import as_rgb, caption, fit, grid_boxes, make_grid, to_uint8
from cnnvis_tb.safety import frozen_copy, model_device, model_dtype, preserved

_log = logging.getLogger("cnnvis_tb")

__all__ = [
    "activation_maximization", "ActMaxConfig", "optimize_channels", "channel_scores", "conv_target_channels",
    "conv_mean_as_linear", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_DIVERSITY_WEIGHT", "ActMax", "BackgroundWork",
    "Transforms", "transform_sizes", "gram_similarity",
]

# Square root of the colour correlation of natural images (ImageNet), as used for decorrelated
# parametrizations in the feature-visualization literature.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


#: Gradient-ascent steps and Adam learning rate by default: on the demo CNN, 24 steps at 0.5 excite the channels
#: more (median 4.0-5.1x the best probe image) than 48 steps at 0.2 did (3.4-4.2x), for half the time.
DEFAULT_STEPS = 24
DEFAULT_LR = 0.5


#: Weight of the diversity penalty, relative to the group's mean activation (see :class:`ActMaxConfig`).
DEFAULT_DIVERSITY_WEIGHT = 0.5

_PAD_MODES = ("reflect", "constant")


@dataclass(frozen=True)
class Transforms:
    """Magnitudes of the random warp of one optimization step: ``pad`` and ``jitter`` in pixels, ``scale`` the
    largest relative change of size (``0.1``: 0.9x to 1.1x), ``rotate`` the largest rotation in degrees."""

    pad: int
    jitter: int
    scale: float
    rotate: float


def transform_sizes(size: tuple[int, int] | int) -> Transforms:
    """The default transform magnitudes for an input of ``size`` (``(H, W)`` or ``S``), from its shorter side ``s``.

    ``pad = ceil(s / 16)``, ``jitter = ceil(s / 28)``, ``scale = 0.05 + 0.05 t`` and ``rotate = round(10 t)`` degrees
    with ``t = clamp((s - 32) / 192, 0, 1)``: a 224 px model gets the strength of the usual ImageNet recipe
    (pad 14, jitter 8, 0.9x-1.1x, +-10 degrees), a 32 px one stays sharp (pad 2, jitter 2, 0.95x-1.05x, no rotation).
    """
    h, w = (size, size) if isinstance(size, int) else size
    side = min(int(h), int(w))
    t = min(1.0, max(0.0, (side - 32) / 192))
    return Transforms(pad=math.ceil(side / 16), jitter=math.ceil(side / 28), scale=0.05 + 0.05 * t,
                      rotate=float(round(10 * t)))


def _check_count(name: str, value, minimum: int, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be None (scaled to the input size) or an int >= {minimum} ({what}), "
                         f"got {value!r}")


def check_diversity(diversity, weight, prefix: str = "") -> None:
    """``diversity`` an int >= 1 (images per channel, 1 = off), ``weight`` a finite number >= 0."""
    if isinstance(diversity, bool) or not isinstance(diversity, int) or diversity < 1:
        raise ValueError(f"{prefix}diversity must be an int >= 1: the number of images per channel, pushed apart "
                         f"from each other (1 = off, e.g. 3), got {diversity!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{prefix}diversity_weight must be a finite number >= 0 (0 = images per channel not pushed "
                         f"apart; default {DEFAULT_DIVERSITY_WEIGHT}), got {weight!r}")


@dataclass(frozen=True)
class ActMaxConfig:
    """Knobs of the optimization.

    Transforms: every step warps the whole batch with ONE random affine map drawn from our own generator (the
    same for every image, so batched and one-at-a-time results agree): a shift of up to ``jitter`` pixels, a
    scaling by up to ``1 +- scale`` and a rotation by up to ``+-rotate`` degrees, at the input size, the border
    the warp uncovers coming from ``pad`` pixels of ``pad_mode`` padding (``"reflect"`` or ``"constant"`` grey).
    ``None`` (the default) scales each to the input's shorter side ``s`` (:func:`transform_sizes`):
    ``pad = ceil(s/16)``, ``jitter = ceil(s/28)``, ``scale = 0.05..0.1`` and ``rotate = 0..10`` degrees, growing
    linearly from 32 px to 224 px: 224 px gets pad 14, jitter 8, 0.9x-1.1x and +-10 degrees (the usual ImageNet
    recipe); 32 px gets pad 2, jitter 2, 0.95x-1.05x and no rotation (as sharp as before). The last ``settle``
    share of the steps (a quarter by default; rounded half up, and the first step is always warped, see
    :func:`unwarped_steps`) optimizes the images unwarped, as they are shown and scored: a warp
    of a few pixels moves the image against a strided layer's sampling grid, so an image robust to every warp is
    weaker at the one view that counts. Measured on the demo CNN (16 channels, 4 seeds): at features.2.0 the
    median activation went from 3.8-4.8x the best of 64 probe images to 7.1-8.3x, and channels whose image beats
    them all from 88-100 % to 100 %, with total variation 3 % higher (images about as smooth).

    Diversity: ``diversity = d > 1`` optimizes ``d`` images per channel in the same batch (``K d`` images) and
    subtracts from the objective, per channel, ``diversity_weight`` x the group's mean activation (detached, so the
    weight means the same on any layer) x the mean pairwise cosine similarity of the images' Gram matrices
    (channels x channels of the layer's activation, flattened over space). ``d = 1`` (the default) is off.
    """

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    jitter: int | None = None
    pad: int | None = None
    scale: float | None = None
    rotate: float | None = None
    pad_mode: str = "reflect"
    tv_weight: float = 0.05
    l2_weight: float = 0.01
    fourier: bool = True
    seed: int = 0
    diversity: int = 1
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT
    settle: float = 0.25

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        _check_count("jitter", self.jitter, 0, "largest random shift in pixels")
        _check_count("pad", self.pad, 0, "pixels of padding around the image before the warp")
        if self.scale is not None and not 0 <= self.scale < 1:
            raise ValueError(f"scale must be None (scaled to the input size) or in [0, 1) (largest relative change "
                             f"of size, e.g. 0.1), got {self.scale!r}")
        if self.rotate is not None and not 0 <= self.rotate <= 180:
            raise ValueError(f"rotate must be None (scaled to the input size) or in [0, 180] degrees, "
                             f"got {self.rotate!r}")
        if isinstance(self.settle, bool) or not (isinstance(self.settle, numbers.Real) and 0 <= self.settle < 1):
            raise ValueError(f"settle must be in [0, 1) (the share of the last steps that optimize the images "
                             f"unwarped, e.g. 0.25; 0 warps every step), got {self.settle!r}")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")
        check_diversity(self.diversity, self.diversity_weight)

    def transforms(self, size: tuple[int, int]) -> Transforms:
        """The magnitudes for an input of ``size``: the ones given, the rest from :func:`transform_sizes`."""
        auto = transform_sizes(size)
        return Transforms(
            pad=auto.pad if self.pad is None else self.pad,
            jitter=auto.jitter if self.jitter is None else self.jitter,
            scale=auto.scale if self.scale is None else float(self.scale),
            rotate=auto.rotate if self.rotate is None else float(self.rotate),
        )


class _Parametrization:
    """Maps a free parameter to ``[K, C, H, W]`` images in ``[0, 1]``."""

    def __init__(self, k: int, c: int, h: int, w: int, fourier: bool, generator: torch.Generator, device):
        self.shape = (k, c, h, w)
        self.fourier = fourier
        if fourier:
            fy = torch.fft.fftfreq(h, device=device)[:, None]
            fx = torch.fft.rfftfreq(w, device=device)[None, :]
            freq = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / max(h, w))
            self.scale = (1.0 / freq) / math.sqrt(h * w)
            one = (c, h, w // 2 + 1, 2)
        else:
            one = (c, h, w)
        # Drawn image by image, so image i starts from the same noise whatever the batch size.
        init = torch.stack([torch.randn(one, generator=generator, device=device) for _ in range(k)]) * 0.01
        self.param = init.requires_grad_(True)
        self.color = _COLOR_SQRT.to(device) if c == 3 else None

    def images(self) -> torch.Tensor:
        k, c, h, w = self.shape
        if self.fourier:
            spectrum = torch.view_as_complex(self.param) * self.scale
            x = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") * 4.0
        else:
            x = self.param
        if self.color is not None:  # mix the colour channels of every pixel: one [3, 3] @ [K, 3, H*W] product
            x = torch.matmul(self.color, x.reshape(k, c, h * w)).view(k, c, h, w)
        return torch.sigmoid(x)


def _augment(x: torch.Tensor, t: Transforms, pad_mode: str, generator: torch.Generator) -> torch.Tensor:
    """One random warp of the whole batch ``[N, C, H, W]`` (see :class:`ActMaxConfig`), keeping the size so any
    head still fits. Always the same draws from ``generator`` (a shift, then a scale and an angle)."""
    h, w = x.shape[-2:]
    device = generator.device
    if t.jitter:
        dy, dx = torch.randint(-t.jitter, t.jitter + 1, (2,), generator=generator, device=device).tolist()
    else:
        dy = dx = 0
    u_scale, u_angle = (torch.rand(2, generator=generator, device=device) * 2 - 1).tolist()
    s = 1.0 + t.scale * u_scale
    angle = math.radians(t.rotate * u_angle)
    pad = min(t.pad, h - 1, w - 1) if pad_mode == "reflect" else t.pad
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode=pad_mode, **({"value": 0.5} if pad_mode == "constant" else {}))
    if s == 1.0 and angle == 0.0 and abs(dy) <= pad and abs(dx) <= pad:  # a plain shift: a crop, exactly
        return x[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    # The source point of each output pixel, in pixels from the centre: rotate and scale back, then unshift;
    # normalized to the padded image (align_corners=False), beyond which edge pixels repeat.
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5 - h / 2
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5 - w / 2
    yo, xo = torch.meshgrid(ys, xs, indexing="ij")
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    src_x = (cos * xo + sin * yo - dx) / ((w + 2 * pad) / 2)
    src_y = (-sin * xo + cos * yo - dy) / ((h + 2 * pad) / 2)
    grid = torch.stack([src_x, src_y], dim=-1).expand(x.shape[0], h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def gram_similarity(acts: torch.Tensor, group: int) -> torch.Tensor:
    """Cosine similarity of the Gram matrices of ``acts`` ``[G * group, C, ...]`` within each group of ``group``
    consecutive images: ``[G, group, group]`` (1 on the diagonal). The Gram matrix of an image is ``A A^T`` with
    ``A`` its activation flattened over space ``[C, positions]``: which channels fire together, wherever."""
    a = acts.float().flatten(2)
    grams = torch.matmul(a, a.transpose(1, 2)).flatten(1)
    grams = F.normalize(grams, dim=1).view(-1, group, grams.shape[1])
    return torch.matmul(grams, grams.transpose(1, 2))


def _diversity_penalty(acts: dict[str, torch.Tensor], scores: torch.Tensor, targets: Sequence[tuple[str, int]],
                       group: int) -> torch.Tensor:
    """Sum over channels of the group's mean activation (detached) x the mean pairwise Gram cosine of its images.

    ``targets`` has one entry per image, each channel's ``group`` images consecutive."""
    total = scores.new_zeros(())
    rows_of: dict[str, list[int]] = {}
    for k, (layer, _) in enumerate(targets):
        rows_of.setdefault(layer, []).append(k)
    for layer, rows in rows_of.items():
        sim = gram_similarity(acts[layer][rows], group)  # [G, d, d]
        pairwise = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)) / (group * (group - 1))
        strength = scores[rows].detach().view(-1, group).abs().mean(dim=1).clamp_min(1e-3)
        total = total + (strength * pairwise).sum() * group
    return total


def channel_scores(
    acts: dict[str, torch.Tensor], targets: Sequence[tuple[str, int]], per_target: Collection[str] = ()
) -> torch.Tensor:
    """Activation of target ``k`` = (layer, channel) in image ``k``: the channel's spatial mean, ``[K]``.

    ``acts[layer]`` is the layer's output for the whole batch ``[K, C, ...]``; for the layers in ``per_target``
    (scored by :func:`conv_mean_as_linear`) it already holds the scores ``[K_layer]``: entry ``j`` is the ``j``-th
    target of that layer in ``targets`` order.
    """
    scores = [None] * len(targets)
    by_layer: dict[str, list[int]] = {}
    for k, (layer, _) in enumerate(targets):
        by_layer.setdefault(layer, []).append(k)
    for layer, ks in by_layer.items():  # one indexing op per layer, not one per target
        a = acts[layer]
        if layer in per_target:
            values = a
        else:
            index = torch.tensor(ks, device=a.device)
            channels = torch.tensor([targets[k][1] for k in ks], device=a.device)
            picked = a[index, channels]
            values = picked.flatten(1).mean(dim=1) if picked.dim() > 1 else picked
        for k, v in zip(ks, values.unbind(), strict=True):
            scores[k] = v
    return torch.stack(scores).float()


def _is_plain_conv(module: nn.Module | None) -> bool:
    """An ``nn.Conv2d`` computing the stock convolution of its ``weight`` (zero padding, no overridden forward or
    ``_conv_forward``, no forward hooks of its own or global ones that could change its input or output): its
    output channels can be computed apart, from its input."""
    from torch.nn.modules import module as module_globals

    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and type(module)._conv_forward is nn.Conv2d._conv_forward
        and module.padding_mode == "zeros"
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)
    )


def conv_target_channels(conv: nn.Conv2d, inputs: torch.Tensor, images: Sequence[int],
                         channels: Sequence[int]) -> torch.Tensor:
    """Output channel ``channels[j]`` of ``conv`` on image ``images[j]`` of ``inputs`` ``[N, C_in, H, W]``, for
    every ``j``: ``[J, H_out, W_out]``, the same values as ``conv(inputs)[images, channels]``.

    One grouped convolution with one group per target computes only those J maps, instead of every output
    channel of every image (:func:`conv_mean_as_linear` uses it once to find each target's linear form).
    """
    index = torch.as_tensor(list(images), device=inputs.device)
    chans = torch.as_tensor(list(channels), device=inputs.device)
    per_group_in = conv.in_channels // conv.groups
    per_group_out = conv.out_channels // conv.groups
    x = inputs[index]  # [J, C_in, H, W]
    if conv.groups > 1:  # each target sees only the input channels of its own group
        first = (chans // per_group_out) * per_group_in
        picks = first[:, None] + torch.arange(per_group_in, device=inputs.device)[None, :]
        x = x.gather(1, picks[:, :, None, None].expand(-1, -1, *x.shape[-2:]))
    j = len(chans)
    bias = conv.bias[chans] if conv.bias is not None else None
    out = F.conv2d(x.reshape(1, j * per_group_in, *x.shape[-2:]), conv.weight[chans], bias,
                   conv.stride, conv.padding, conv.dilation, groups=j)
    return out[0]


def conv_mean_as_linear(conv: nn.Conv2d, input_shape: Sequence[int], channels: Sequence[int], *, device=None,
                        dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The spatial mean of output channel ``channels[j]`` of ``conv`` as a linear function of one input image.

    A convolution is affine in its input, and so is the mean of an output channel over all positions: for an input
    ``x`` of ``input_shape[1:]``, ``conv(x)[channels[j]].mean() == (x * weights[j]).sum() + offsets[j]``. Returns
    ``(weights [J, *input_shape[1:]], offsets [J])``, found once by differentiating the channel means at a zero
    input, so that an activation-maximization step scores its deepest convolution with one product and sum
    instead of running it (forward and backward), whatever its stride, zero padding, dilation and groups.
    """
    j = len(channels)
    x = torch.zeros((j, *input_shape[1:]), device=device, dtype=dtype, requires_grad=True)
    means = conv_target_channels(conv, x, range(j), channels).flatten(1).mean(dim=1)
    (weights,) = torch.autograd.grad(means.sum(), [x])
    return weights, means.detach()


class _LinearScore:
    """Scores targets ``rows`` of a batch at a plain convolution from the convolution's input (conv_mean_as_linear)."""

    def __init__(self, conv: nn.Conv2d, rows: Sequence[int], channels: Sequence[int]):
        self.conv, self.channels = conv, list(channels)
        rows = list(rows)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        self.pick = slice(rows[0], rows[0] + len(rows)) if rows and contiguous else rows
        self.key = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[self.pick]
        key = (tuple(x.shape), x.device, x.dtype)
        if key != self.key:  # once per optimization: the input size is the same at every step
            self.key = key
            self.weights, self.offsets = conv_mean_as_linear(self.conv, x.shape, self.channels, device=x.device,
                                                             dtype=x.dtype)
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                self.weights = self.weights.contiguous(memory_format=torch.channels_last)
        return (x * self.weights).flatten(1).sum(dim=1) + self.offsets


def optimize_channels(
    net: nn.Module,
    modules: dict[str, nn.Module],
    targets: Sequence[tuple[str, int]],
    size: tuple[int, int],
    image_channels: int,
    *,
    mean=None,
    std=None,
    config: ActMaxConfig = ActMaxConfig(),
    stop_after: str | None = None,
) -> torch.Tensor:
    """Optimize one image per ``(layer name, channel)`` target, all in one batch. Returns ``[K, C, H, W]`` in [0, 1].

    With ``config.diversity = d > 1``: ``d`` images per target, ``[K d, C, H, W]``, the ``d`` images of target ``k``
    at rows ``k d`` to ``k d + d - 1``, pushed apart by the Gram-matrix diversity penalty (see :class:`ActMaxConfig`).
    ``net`` must already be in eval mode with state preserved by the caller (``preserved``); ``modules`` maps the
    layer names used in ``targets`` to their modules; ``stop_after`` cuts each forward pass after that layer.
    """
    device, dtype = model_device(net), model_dtype(net)
    group = config.diversity
    per_image = [t for t in targets for _ in range(group)]  # one (layer, channel) per image of the batch
    transforms = config.transforms(size)
    # Separate streams for the starting noise and the augmentations, so that image i of a batch sees the
    # same random numbers whatever the batch size (batched and one-at-a-time results agree).
    noise = torch.Generator(device=device).manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    param = _Parametrization(len(per_image), image_channels, size[0], size[1], config.fourier, noise, device)
    # Adam by hand: a few tensor ops, and no torch.optim machinery to import or keep state for.
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = torch.zeros_like(param.param)
    v = torch.zeros_like(param.param)
    # The deepest layer, when it is a plain convolution, is not run: the forward pass stops at its input, and the
    # mean of each image's target channel is a fixed linear function of that input (conv_mean_as_linear). The
    # diversity penalty needs the layer's whole activation, so it runs the layer.
    last = modules.get(stop_after) if stop_after is not None else None
    shortcut = _is_plain_conv(last) and group == 1
    hooked = {n: mod for n, mod in modules.items() if not (shortcut and n == stop_after)}
    if shortcut:
        rows = [k for k, (layer, _) in enumerate(targets) if layer == stop_after]
        linear_score = _LinearScore(last, rows, [targets[k][1] for k in rows])
    # On the CPU, oneDNN convolutions of a batch run several times faster on channels-last input (measured:
    # 16 x 32 px through the demo CNN's convolutions, forward and input gradient, 1.5-4x); the layers follow
    # the input's layout. Only our input tensor changes layout; the model's parameters are not touched.
    layout = torch.channels_last if device.type == "cpu" and len(per_image) > 1 else torch.contiguous_format
    diverse = group > 1 and config.diversity_weight > 0
    warped = config.steps - unwarped_steps(config.steps, config.settle)  # the later steps see the images unwarped
    for t in range(1, config.steps + 1):
        images = param.images()
        seen = _augment(images, transforms, config.pad_mode, generator) if t <= warped else images
        x = _normalize(seen, mean, std).to(dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=layout)
        with capture(hooked, for_grad=True, stop_after=None if shortcut else stop_after, stop_before=(
                {stop_after: last} if shortcut else None)) as acts:
            net(x)
        if shortcut:
            acts[stop_after] = linear_score(acts.pop(f"{stop_after}:input"))
        scores = channel_scores(acts, per_image, per_target=(stop_after,) if shortcut else ())
        objective = scores.sum()
        if diverse:
            objective = objective - config.diversity_weight * _diversity_penalty(acts, scores, per_image, group)
        penalty = config.tv_weight * _total_variation(images) + config.l2_weight * ((images - 0.5) ** 2).mean()
        loss = -objective + penalty * len(per_image)
        (grad,) = torch.autograd.grad(loss, [param.param])
        with torch.no_grad():
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = config.lr / (1 - beta1**t)
            param.param.addcdiv_(m, (v / (1 - beta2**t)).sqrt_().add_(eps), value=-step)
    with torch.no_grad():
        return param.images().detach().float()


def unwarped_steps(steps: int, settle: float) -> int:
    """How many of the last of ``steps`` optimization steps see the images unwarped: ``settle · steps`` rounded
    half up, at most ``steps - 1`` (the first step is always warped, so ``settle < 1`` never turns the transforms
    off), 0 for ``settle=0``."""
    return min(steps - 1, math.floor(settle * steps + 0.5))


def activation_maximization(
    model: nn.Module,
    layer: str | nn.Module,
    channels: Sequence[int],
    size: tuple[int, int] | int,
    *,
    image_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    jitter: int | None = None,
    fourier: bool = True,
    seed: int = 0,
    diversity: int = 1,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    settle: float = 0.25,
) -> torch.Tensor:
    """Synthesize one image per channel of ``layer`` that excites that channel, all optimized as one batch.

    Args:
        model: the network (wrappers looked through); it runs in eval mode and is restored afterwards.
        layer: module or ``named_modules()`` name.
        channels: channel indices of the layer's output to maximize.
        size: ``(H, W)`` or ``S`` of the synthesized images (the model's input size).
        image_channels: channels of the model's input (3 for RGB, 1 for grayscale).
        mean, std: the model's input normalization; images are optimized in ``[0, 1]`` and normalized before
            the forward pass.
        steps, lr, jitter, fourier, seed, settle: optimization settings (see :class:`ActMaxConfig`;
            ``jitter=None`` scales the shift, padding, scaling and rotation to the input size; the last ``settle``
            share of the steps optimizes the images unwarped).
        diversity, diversity_weight: ``diversity`` images per channel, pushed apart by their Gram matrices with
            that weight (see :class:`ActMaxConfig`); 1 is off.

    Returns:
        ``[len(channels) * diversity, image_channels, H, W]`` float in ``[0, 1]``, detached, on the model's device;
        the images of ``channels[k]`` at rows ``k * diversity`` to ``k * diversity + diversity - 1``.
    """
    net = unwrap_model(model)
    name, module = resolve_layer(net, layer)
    channels = [int(c) for c in channels]
    if not channels:
        raise ValueError("channels must name at least one channel")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    config = ActMaxConfig(steps=steps, lr=lr, jitter=jitter, fourier=fourier, seed=seed, diversity=diversity,
                          diversity_weight=diversity_weight, settle=settle)
    with preserved(net):
        probe_out = _layer_channels(net, name, module, image_channels, (h, w), mean, std)
        bad = [c for c in channels if not 0 <= c < probe_out]
        if bad:
            raise ValueError(f"channels {bad} out of range: layer {name!r} has {probe_out} channels")
        return optimize_channels(
            net, {name: module}, [(name, c) for c in channels], (h, w), image_channels,
            mean=mean, std=std, config=config, stop_after=name,
        )


def _layer_channels(net, name, module, image_channels, size, mean, std) -> int:
    x = torch.full((1, image_channels, *size), 0.5, device=model_device(net), dtype=model_dtype(net))
    with torch.no_grad(), capture({name: module}, stop_after=name) as acts:
        net(_normalize(x, mean, std))
    if name not in acts:
        raise RuntimeError(f"layer {name!r} did not run in the forward pass")
    return acts[name].shape[1]


class SnapshotKind(Kind):
    """A kind whose work may run on its own :class:`BackgroundWork` (``self._worker``) from a snapshot of the model:
    ``compute`` returns None when it handed the work over (the worker then calls ``self._write``), else what
    ``self._write(out, computed)`` draws."""

    def log(self, ctx: StepContext, out: Output, computed) -> None:
        if computed is None:  # on the background worker, which writes when it is done
            return
        self._write(out, computed)
        for _ in self.each_layer(ctx.net):  # after the layers still there have logged: name the missing ones
            pass

    def wait_for_background(self) -> None:
        self._worker.wait()

    def close(self) -> None:
        self._worker.close()


class ActMax(SnapshotKind):
    """The ``actmax`` kind: activation-maximization images of chosen channels (``cnnvis/actmax/<layer>/channels``),
    every channel of every layer in one batched optimization.

    Args:
        channels: channels per layer (spread evenly over the layer's channels), or ``{layer: [channels]}``
            (those layers are added to the kind's layers).
        steps: gradient-ascent steps per log.
        background: optimize on a frozen snapshot of the model in a worker thread, so the training loop is
            blocked only while the snapshot is taken; results are logged at the snapshot's step. A step that comes
            while the previous one still runs is skipped with one warning. :meth:`close` waits for the worker.
        diversity: images per channel (1: one, the default), pushed apart from each other by the cosine similarity
            of their Gram matrices at the layer; the picture shows each channel's images in one row (panels
            ``channel_<c>/<i>``, ``i`` from 1).
        diversity_weight: weight of that penalty, relative to the channel's activation (see :class:`ActMaxConfig`).
    """

    name, label, every = "actmax", "Activation max.", 1000
    #: On the random weights of step 0 it shows nothing learned, and it is the costliest kind.
    at_step_zero = False
    #: compute optimizes (or hands a snapshot to the kind's own worker); log only draws the images it returned.
    log_in_background = True

    def __init__(self, *, channels: int | Mapping[str, Sequence[int]] = 8, steps: int = DEFAULT_STEPS,
                 background: bool = False, diversity: int = 1,
                 diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT, every: int | None = None, layers=None) -> None:
        super().__init__(every=every, layers=layers)
        if not isinstance(channels, Mapping):
            positive_int("actmax_channels", channels)
        self.channels_spec = channels
        self.steps = positive_int("actmax_steps", steps)
        self.background = bool(background)
        check_diversity(diversity, diversity_weight, prefix="actmax_")
        self.diversity, self.diversity_weight = diversity, float(diversity_weight)
        self.targets: list[tuple[str, int]] = []
        self._worker = BackgroundWork(self, "activation maximization")

    @classmethod
    def from_options(cls, options):
        return cls(channels=options.get("actmax_channels", 8), steps=options.get("actmax_steps", DEFAULT_STEPS),
                   background=options.get("actmax_background", False),
                   diversity=options.get("actmax_diversity", 1))

    def default_layers(self, info: ModelInfo) -> list[str]:
        spread = info.spread_layers(3)
        return spread[-2:] if len(spread) > 1 else spread

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.config = ActMaxConfig(steps=self.steps, seed=info.seed, diversity=self.diversity,
                                   diversity_weight=self.diversity_weight)
        shapes = info.layer_shapes
        spec = self.channels_spec
        targets: list[tuple[str, int]] = []
        if isinstance(spec, Mapping):
            for name, chans in spec.items():
                layer, _ = resolve_layer(info.net, name)
                if layer not in self.layers:
                    self.layers.append(layer)
                targets += [(layer, int(c)) for c in chans]
        else:
            for layer in self.layers:
                shape = shapes.get(layer)
                total = shape[1] if shape is not None and len(shape) > 1 else 1
                count = min(spec, total)
                picks = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
                targets += [(layer, c) for c in picks]
        for layer, channel in targets:
            shape = shapes.get(layer)
            if shape is None or len(shape) != 4:
                raise ValueError(f"actmax layer {layer!r} must output a spatial map [N, C, H, W], got {shape}")
            if not 0 <= channel < shape[1]:
                raise ValueError(f"actmax channel {channel} out of range: layer {layer!r} has {shape[1]} channels")
        self.targets = targets

    def details(self) -> str:
        per_channel = f", {self.diversity} images each" if self.diversity > 1 else ""
        return super().details() + f"; {len(self.targets)} channels{per_channel}, {self.steps} steps"

    # ------------------------------------------------------------------ a logging step
    def compute(self, ctx: StepContext) -> dict[str, torch.Tensor] | None:
        _log.info("step %d: activation maximization of %d channels, %d steps%s", ctx.step, len(self.targets),
                  self.steps, " (in the background)" if self.background else "")
        if not self.background or not self._worker.may_run(ctx):
            return self._images(ctx.net)
        self._worker.submit(ctx, self._images, self._write)
        return None


    # ------------------------------------------------------------------ the work
    def _images(self, net: nn.Module) -> dict[str, torch.Tensor]:
        modules = {name: m for name, m in net.named_modules() if name in self.layers}
        targets = [(layer, c) for layer, c in self.targets if layer in modules]
        if not targets:
            next(self.each_layer(net), None)  # raises, naming the missing layers
        order = {t.name: t.order for t in self.info.traces}
        images = optimize_channels(
            net, modules, targets, tuple(self.info.probe.images.shape[-2:]), self.info.probe.images.shape[1],
            mean=self.info.mean, std=self.info.std, config=self.config,
            stop_after=max(modules, key=lambda n: order.get(n, -1)),
        ).cpu()
        d = self.diversity
        # A layer without targets (a default layer beside an actmax_channels mapping) has no picture.
        return {layer: images[[k * d + j for k, (name, _) in enumerate(targets) if name == layer for j in range(d)]]
                for layer in modules if any(name == layer for name, _ in targets)}

    def _write(self, out: Output, per_layer: dict[str, torch.Tensor]) -> None:
        d = self.diversity
        for layer, images in per_layer.items():
            channels = [c for name, c in self.targets if name == layer]
            tiles = fit(as_rgb(images), 64, 96)
            ncol = min(8, len(channels)) if d == 1 else d  # with diversity: one row per channel
            grid = make_grid(tiles, ncol=ncol, padding=2)
            title = f"{layer} channels: " + ", ".join(map(str, channels))
            picture = caption(grid, [title if d == 1 else f"{title} ({d} images each, one row per channel)"])
            boxes = grid_boxes(len(channels) * d, ncol, tuple(tiles.shape[-2:]), padding=2)
            if d == 1:
                names = [(f"channel_{c}", f"channel {c}") for c in channels]
            else:
                names = [(f"channel_{c}/{j}", f"channel {c} #{j}") for c in channels for j in range(1, d + 1)]
            panels = [{"key": key, "label": label, "box": box, "text": [label]}
                      for (key, label), box in zip(names, boxes, strict=True)]
            out.image(layer, "channels", to_uint8(picture), panels)


class BackgroundWork:
    """The background mode of a heavy kind (activation maximization, DeepDream): its optimization runs on a frozen
    snapshot of the model in a worker thread, so the training loop is blocked only while the snapshot is taken, and
    its pictures are written at the snapshot's step when it is done.

    One optimization at a time: a logging step that comes while the previous one still runs is skipped with one
    warning. A failure warns once (raises on the worker under ``strict``). :meth:`close` waits for the worker.
    """

    def __init__(self, kind: Kind, what: str) -> None:
        self.kind, self.what = kind, what
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._pid = os.getpid()
        self._failure: BaseException | None = None  # under strict: the worker's failure, raised at the next call

    def may_run(self, ctx: StepContext) -> bool:
        """Whether the model may run on the worker (:meth:`ModelInfo.may_run_elsewhere`, which says why not once).
        When not, the kind does its work on the training thread, after the work of earlier steps still running here
        (so the pictures come in order)."""
        if ctx.info.may_run_elsewhere(ctx.net, f"background {self.what}"):
            return True
        self.wait()
        return False

    def submit(self, ctx: StepContext, work: Callable[[nn.Module], object],
               write: Callable[[Output, object], None]) -> None:
        """Snapshot ``ctx.net`` now; on the worker, ``write(out, work(snapshot))`` into an output at ``ctx.step``."""
        self._forget_parents_worker()
        self._raise_failure()
        self._pending = [f for f in self._pending if not f.done()]
        name = self.kind.name
        if self._pending:
            ctx.warn_once(f"{name}-busy", f"{self.what} of an earlier step is still running; step {ctx.step} is "
                          f"skipped (use a larger every[{name!r}])")
            return
        snapshot = frozen_copy(ctx.net)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cnnvis-{name}")
        try:
            self._pending.append(self._executor.submit(self._run, snapshot, ctx.step, work, write))
        except RuntimeError:  # Python stopped its pools (the main thread ended, training goes on in another): here
            self._executor = None
            self._run(snapshot, ctx.step, work, write)
            self._raise_failure()

    def wait(self) -> None:
        """Wait for the work still running (its pictures written); a failure there under ``strict`` raises here."""
        self._forget_parents_worker()
        for future in list(self._pending):
            future.exception()  # (the worker reports its own failures: warned, or kept under strict)
        self._pending = [f for f in self._pending if not f.done()]
        self._raise_failure()

    def close(self) -> None:
        """Wait for the work still running, then stop the worker; a failure there under ``strict`` raises here."""
        self._forget_parents_worker()
        for future in list(self._pending):
            future.exception()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._pending = []
        self._raise_failure()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _run(self, snapshot: nn.Module, step: int, work, write) -> None:
        info = self.kind.info
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = work(snapshot)
            with info.open_output(self.kind, step) as out:
                write(out, result)
        except Exception as e:
            if info.strict:  # raised on the training thread at the kind's next logging step, wait() or close()
                self._failure = self._failure or e
                return
            info.warn_once(f"{self.kind.name}-bg-{type(e).__name__}", f"background {self.what} failed at step "
                           f"{step}: {type(e).__name__}: {e}")

    def _forget_parents_worker(self) -> None:
        """In a process forked from the one that started the background worker, that worker does not exist:
        forget it and its unfinished work (the parent finishes and logs it), so nothing waits on it forever."""
        if os.getpid() != self._pid:
            self._pid, self._executor, self._pending = os.getpid(), None, []
