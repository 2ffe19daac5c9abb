"""The CAM family: one table of small functions, each a class-activation map from one layer.

Every method maps a :class:`CamInputs` (the layer's activations ``A [N, K, h, w]``, and what else it declared:
the gradients ``g = d score / d A``, bias-layer gradients, the input gradient, or extra forward passes) to raw maps
``[N, h', w']``; :func:`cnnvis_tb.kinds.cam.cam` then applies ReLU, resizes bilinearly to the input and scales each
map to ``[0, 1]``. Formulas (``mean_ij``/``sum_ij``: over the spatial positions, ``sum_k``: over channels):

* ``cam`` (Zhou et al. 2016): ``sum_k W[c, k] A_k`` with ``W`` the linear head after global average pooling.
* ``gradcam``: ``sum_k mean_ij(g_k) A_k``.
* ``gradcam++`` (Chattopadhay et al. 2018, eq. 19 with the exponential's derivatives):
  ``alpha = g² / (2 g² + sum_ij(A) g³)`` (0 where that is 0/0), ``w_k = sum_ij(alpha relu(g))``.
* ``xgradcam`` (Fu et al. 2020): ``w_k = sum_ij(g A) / (sum_ij(A) + 1e-7)``.
* ``hirescam`` (Draelos & Carin 2020): ``sum_k g_k * A_k`` elementwise, no averaging.
* ``layercam`` (Jiang et al. 2021): ``sum_k relu(g_k) * A_k``.
* ``eigencam`` (Muhammad & Yeasin 2020): the projection of the centred activations ``[hw, K]`` on their first
  principal direction. An SVD's sign is arbitrary; ours is chosen so the projection correlates positively with
  ``sum_k A_k`` (where the layer is active), before the ReLU. The direction is the leading eigenvector of the
  smaller Gram matrix, found by repeated squaring and checked (:func:`_leading_eigenvectors`).
* ``eigengradcam``: Eigen-CAM of ``g * A``, same sign rule applied with ``sum_k g_k A_k``.
* ``scorecam`` (Wang et al. 2020): each channel, upsampled (bilinear, corners aligned) and min-max scaled to
  ``[0, 1]``, masks the input; ``w = softmax_k(score of the masked input)``. Constant channels give an all-zero mask
  and one shared forward; the others run batched, at most ``batch_size`` masked images per pass.
* ``ablationcam`` (Desai & Ramaswamy 2020): ``w_k = (s - s_k) / s``, ``s_k`` the score with channel ``k`` of the
  layer set to 0. Only the network after the layer runs on the ablated copies when it can (see
  :func:`_ablated_scores`); otherwise whole forwards.
* ``fullgrad`` (Srinivas & Fleuret 2019): ``|x * dx|`` per input channel plus, for every ``Conv2d`` /
  ``BatchNorm2d`` with a bias, ``|b * g|`` per channel (BatchNorm's bias folded with its running statistics), each
  map min-max scaled, resized to the input and summed. It ignores the chosen layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb.hooks import capture
from cnnvis_tb.layers import select_output

__all__ = ["CamMethod", "CamInputs", "METHODS", "check_methods", "bias_layers", "linear_head", "Scorer"]

_EPS = 1e-7

#: ``scorer(outputs, owner) -> [B]``: the target score of each row of a forward's outputs, ``owner[b]`` being the probe
#: image whose target row ``b`` is scored for.
Scorer = Callable[[object, torch.Tensor], torch.Tensor]


@dataclass
class CamInputs:
    """What a method may read. ``acts``/``grads``: ``[N, K, h, w]`` float32, detached. The rest is filled only for
    the methods that declared they need it."""

    acts: torch.Tensor
    grads: torch.Tensor | None = None
    net: nn.Module | None = None
    layer: str = ""
    module: nn.Module | None = None
    images: torch.Tensor | None = None  # the model input [N, C, H, W] (perturbation methods, fullgrad)
    scorer: Scorer | None = None  # perturbation methods
    base_scores: torch.Tensor | None = None  # [N] target scores of the unperturbed images
    input_grads: torch.Tensor | None = None  # fullgrad
    bias_grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name: (bias, grad)
    head_weights: torch.Tensor | None = None  # cam: [N, K] weights of each image's target class
    batch_size: int = 64
    forwards: list[int] = field(default_factory=lambda: [0])  # extra forward passes run (counted)


@dataclass(frozen=True)
class CamMethod:
    """One method: its label, what it needs and its function ``CamInputs -> [N, h', w']`` (before ReLU)."""

    name: str
    label: str
    fn: Callable[[CamInputs], torch.Tensor]
    gradients: bool = False  # d score / d layer output
    forwards: bool = False  # extra forward passes over perturbed inputs
    full_gradients: bool = False  # fullgrad: gradients at every bias layer and at the input
    head: bool = False  # cam: the linear head's weights


def _weighted(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nk,nkhw->nhw", weights, acts)


def _gradcam(a: CamInputs) -> torch.Tensor:
    return _weighted(a.grads.mean(dim=(2, 3)), a.acts)


def _gradcam_pp(a: CamInputs) -> torch.Tensor:
    g = a.grads
    # alpha * relu(g) = g² relu(g) / (g² (2 + sum(A) g)) = relu(g) / (2 + sum(A) g) where g > 0;
    # the g² factor cancels, which saves two full-size products. relu(g) / denom is 0 where g <= 0 except 0/0 (NaN),
    # and inf where g > 0 and denom = 0: both become 0, the formula's 0/0 rule, without a mask.
    denom = a.acts.sum(dim=(2, 3), keepdim=True) * g + 2
    ratio = g.clamp_min(0).div_(denom).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return _weighted(ratio.sum(dim=(2, 3)), a.acts)


def _xgradcam(a: CamInputs) -> torch.Tensor:
    weights = (a.grads * a.acts).sum(dim=(2, 3)) / (a.acts.sum(dim=(2, 3)) + _EPS)
    return _weighted(weights, a.acts)


def _hirescam(a: CamInputs) -> torch.Tensor:
    return (a.grads * a.acts).sum(dim=1)


def _layercam(a: CamInputs) -> torch.Tensor:
    return (a.grads.clamp_min(0) * a.acts).sum(dim=1)


#: Gram matrices up to this size get their leading eigenvector by repeated squaring (below); larger ones (and those
#: of at most 16 rows, where LAPACK is quicker) by ``torch.linalg.eigh``.
_SQUARING_SIZES = (17, 256)
#: Squarings before each check: ``G^64`` first (enough when ``λ2/λ1`` is below about 0.85, as in the CAM layers of
#: the demo CNN and ResNet-18 measured here), then, for the matrices not converged, on to ``G^1024``.
_SQUARING_STAGES = (6, 4)


def _by_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading eigenvector and eigenvalue of each ``[N, d, d]`` by LAPACK (``eigh`` sorts them ascending)."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, :, -1], values[:, -1]


def _trace_normalized_(power: torch.Tensor) -> torch.Tensor:
    """Divides each ``[d, d]`` of ``power`` by its trace, in place (a zero trace leaves it as it is)."""
    trace = power.diagonal(dim1=1, dim2=2).sum(1)
    return power.div_(trace.clamp_min(torch.finfo(power.dtype).tiny)[:, None, None])


def _squared(power: torch.Tensor, times: int) -> torch.Tensor:
    """``power^(2^times)`` of each trace-1 ``[d, d]``, trace-normalized after every third squaring (a trace-1
    matrix's leading eigenvalue is at least 1/d: three squarings stay above d^-8) and at the end."""
    spare = torch.empty_like(power)
    for i in range(times):
        power, spare = torch.bmm(power, power, out=spare), power
        if i % 3 == 2 or i == times - 1:
            _trace_normalized_(power)
    return power


def _checked(gram: torch.Tensor, power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The longest column of each ``power`` as the unit eigenvector estimate, its Rayleigh quotient on ``gram``, and
    whether it is not an eigenvector yet (the residual ``|G v - ρ v| > 1e-4 |G v|``)."""
    n, d, _ = gram.shape
    longest = power.norm(dim=1).argmax(dim=1)  # [N]: the column with most of v1 in it
    vectors = power.gather(2, longest.view(n, 1, 1).expand(n, d, 1))[:, :, 0]
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    applied = torch.bmm(gram, vectors[:, :, None])[:, :, 0]
    values = (applied * vectors).sum(1)  # the Rayleigh quotient
    residual = (applied - values[:, None] * vectors).norm(dim=1)
    return vectors, values, residual > 1e-4 * applied.norm(dim=1)


def _leading_eigenvectors(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit eigenvector of the largest eigenvalue of each symmetric positive semi-definite ``[N, d, d]``, and
    that eigenvalue: ``([N, d], [N])``.

    For ``d`` in :data:`_SQUARING_SIZES`, by repeated squaring: ``G^(2^s)`` is ``λ1^(2^s) v1 v1ᵀ`` up to
    ``(λ2/λ1)^(2^s)``, so its longest column is ``v1`` once that is small. Small matrix products cost 3-5x less
    than an eigendecomposition here (LAPACK's ``syevd`` finds all ``d`` pairs; we want one). Each result is checked
    (the residual ``|G v - ρ v| <= 1e-4 |G v|``) after each of :data:`_SQUARING_STAGES`: the matrices that fail
    are squared on, and any that fails the last check (two leading eigenvalues within about 1 %) is redone with
    ``eigh``."""
    d = gram.shape[1]
    if not _SQUARING_SIZES[0] <= d <= _SQUARING_SIZES[1]:
        return _by_eigh(gram)
    power = _trace_normalized_(gram.clone())
    vectors, values = gram.new_empty(gram.shape[:2]), gram.new_empty(gram.shape[:1])
    todo = torch.arange(gram.shape[0], device=gram.device)  # the matrices not converged yet
    for times in _SQUARING_STAGES:
        power = _squared(power, times)
        vectors[todo], values[todo], unsure = _checked(gram[todo], power)
        if not unsure.any():
            return vectors, values
        todo, power = todo[unsure], power[unsure]
    vectors[todo], values[todo] = _by_eigh(gram[todo])
    return vectors, values


def _first_component(x: torch.Tensor) -> torch.Tensor:
    """``[N, K, h, w]`` -> the centred ``[hw, K]`` rows projected on their first principal direction ``[N, h, w]``,
    signed to correlate positively with ``sum_k x_k``."""
    n, k, h, w = x.shape
    rows = torch.nan_to_num(x).flatten(2).transpose(1, 2)  # [N, hw, K]
    centred = rows - rows.mean(dim=1, keepdim=True)
    # The first principal direction from the smaller Gram matrix ([hw, hw] or [K, K]) instead of a full SVD: the
    # projection C v1 equals sigma1 u1, so either side gives it.
    if h * w <= k:
        vectors, values = _leading_eigenvectors(centred @ centred.transpose(1, 2))  # [N, hw, hw]
        projection = vectors * values[:, None].clamp_min(0).sqrt()
    else:
        vectors, _ = _leading_eigenvectors(centred.transpose(1, 2) @ centred)  # [N, K, K]
        projection = torch.einsum("npk,nk->np", centred, vectors)  # [N, hw]
    total = rows.sum(dim=2)
    agreement = ((projection - projection.mean(1, keepdim=True)) * (total - total.mean(1, keepdim=True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.dtype)
    return (projection * sign[:, None]).view(n, h, w)


def _eigencam(a: CamInputs) -> torch.Tensor:
    return _first_component(a.acts)


def _eigengradcam(a: CamInputs) -> torch.Tensor:
    return _first_component(a.grads * a.acts)


def _cam(a: CamInputs) -> torch.Tensor:
    return _weighted(a.head_weights, a.acts)


def _minmax(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo = maps.amin(dim=dims, keepdim=True)
    return (maps - lo) / (maps.amax(dim=dims, keepdim=True) - lo + _EPS)


def _scorecam(a: CamInputs) -> torch.Tensor:
    n, k = a.acts.shape[:2]
    size = a.images.shape[-2:]
    up = F.interpolate(a.acts, size=size, mode="bilinear", align_corners=True)  # [N, K, H, W]
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    masks = (up - lo) / (hi - lo + 1e-8)
    constant = (hi == lo).view(n, k)
    scores = torch.empty(n, k, dtype=torch.float32, device=a.acts.device)
    x = a.images
    if constant.any():  # an all-zero mask: the same input (zeros) for every such channel of every image
        owners = torch.nonzero(constant)[:, 0]
        zero = torch.zeros_like(x[:1]).expand(len(owners), *x.shape[1:])
        scores[constant] = _scores_in_batches(a, lambda rows: zero[rows], owners, unique_input=True)
    pairs = torch.nonzero(~constant)  # [P, 2]: image, channel
    if len(pairs):
        img, ch = pairs[:, 0], pairs[:, 1]
        masked = lambda rows: x[img[rows]] * masks[img[rows], ch[rows]][:, None].to(x.dtype)  # noqa: E731
        scores[~constant] = _scores_in_batches(a, masked, img)
    return _weighted(scores.softmax(dim=1), a.acts)


def _scores_in_batches(a: CamInputs, make: Callable[[torch.Tensor], torch.Tensor], owners: torch.Tensor,
                       unique_input: bool = False) -> torch.Tensor:
    """Target scores of ``make(rows)`` for every row, ``batch_size`` rows per no-grad forward (one forward when
    every row is the same input)."""
    out = []
    with torch.no_grad():
        if unique_input:
            a.forwards[0] += 1
            one = a.net(make(torch.arange(1, device=owners.device)))
            # every row is the same image: score it once per distinct target owner
            return a.scorer(_repeat_output(one, len(owners)), owners).float()
        for start in range(0, len(owners), a.batch_size):
            rows = torch.arange(start, min(len(owners), start + a.batch_size), device=owners.device)
            a.forwards[0] += 1
            out.append(a.scorer(a.net(make(rows)), owners[rows]).float())
    return torch.cat(out)


def _repeat_output(output: object, count: int) -> object:
    if isinstance(output, torch.Tensor):
        return output.expand(count, *output.shape[1:])
    if isinstance(output, (tuple, list)):
        return type(output)(_repeat_output(o, count) for o in output)
    if isinstance(output, dict):
        return {key: _repeat_output(v, count) for key, v in output.items()}
    return output


def _ablationcam(a: CamInputs) -> torch.Tensor:
    ablated = _ablated_scores(a)  # [N, K]
    base = a.base_scores.float()[:, None]
    # A score of exactly 0 (a ReLU'd classifier output) would divide by zero; dividing by a per-image constant only
    # scales the map, which the final min-max scaling undoes, so 1 is used there.
    return _weighted((base - ablated) / torch.where(base == 0, 1.0, base), a.acts)


def _ablated_scores(a: CamInputs) -> torch.Tensor:
    """``[N, K]`` target scores with each channel of the layer set to 0.

    Fast path: the forward runs on one probe image and the layer's output is replaced, inside the forward, by
    ``B`` copies of that image's activation with one channel zeroed each, so only the network after the layer runs
    ``B`` times. One extra, unablated copy checks that this gives the model's own score (a later layer that mixes
    tensors from before the layer, or reshapes by the input's batch size, fails the check or raises); then whole
    forwards of ``B`` copies of the image, with the layer's output ablated in each, are used instead.
    """
    n, k = a.acts.shape[:2]
    try:
        return _ablated_after_layer(a)
    except _FastPathUnsound:
        pass
    scores = torch.empty(n, k, dtype=torch.float32, device=a.acts.device)
    for i in range(n):
        for start in range(0, k, a.batch_size):
            channels = torch.arange(start, min(k, start + a.batch_size), device=a.acts.device)
            scores[i, channels] = _run_ablated(a, a.images[i:i + 1].expand(len(channels), *a.images.shape[1:]),
                                               i, channels, replace_whole=False)
    return scores


class _FastPathUnsound(Exception):
    """The network after the layer cannot be run alone on expanded copies."""


def _ablated_after_layer(a: CamInputs) -> torch.Tensor:
    n, k = a.acts.shape[:2]
    scores = torch.empty(n, k, dtype=torch.float32, device=a.acts.device)
    checked = False
    for i in range(n):
        for start in range(0, k, a.batch_size):
            channels = torch.arange(start, min(k, start + a.batch_size), device=a.acts.device)
            with_check = not checked
            try:
                got = _run_ablated(a, a.images[i:i + 1], i, channels, replace_whole=True, check=with_check)
            except _FastPathUnsound:
                raise
            except Exception as e:  # shapes that do not broadcast: a later layer mixes tensors from before
                raise _FastPathUnsound(str(e)) from e
            if with_check:
                checked = True
                base = a.base_scores[i].float()
                if not torch.allclose(got[-1], base, rtol=1e-4, atol=1e-5 * max(1.0, float(base.abs()))):
                    raise _FastPathUnsound("the unablated copy's score differs from the model's")
                got = got[:-1]
            scores[i, channels] = got
    return scores


def _run_ablated(a: CamInputs, x: torch.Tensor, image: int, channels: torch.Tensor, *, replace_whole: bool,
                 check: bool = False) -> torch.Tensor:
    """One no-grad forward of ``x`` whose layer output is replaced by copies of image ``image``'s activation, copy
    ``j`` with channel ``channels[j]`` zeroed (plus, with ``check``, one unablated copy last)."""
    count = len(channels) + int(check)

    def hook(_module, _inputs, output):
        tensor = output if isinstance(output, torch.Tensor) else None
        if tensor is None:
            raise _FastPathUnsound("the layer's output is not a single tensor")
        if replace_whole:
            copies = tensor[:1].expand(count, *tensor.shape[1:]).clone()
        else:
            copies = tensor.clone()
        copies[torch.arange(len(channels), device=tensor.device), channels] = 0
        return copies

    handle = a.module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            a.forwards[0] += 1
            output = a.net(x)
    finally:
        handle.remove()
    owners = torch.full((count,), image, dtype=torch.long, device=a.acts.device)
    scores = a.scorer(output, owners).float()
    if scores.shape[0] != count:
        raise _FastPathUnsound(f"the model returned {scores.shape[0]} rows for {count} ablated copies")
    return scores


def _fullgrad(a: CamInputs) -> torch.Tensor:
    size = a.images.shape[-2:]
    x_part = _minmax((a.input_grads * a.images).abs().float(), (2, 3)).sum(dim=1)  # [N, H, W]
    total = x_part
    for bias, grad in a.bias_grads.values():
        per_channel = _minmax((bias.view(1, -1, 1, 1).float() * grad.float()).abs(), (2, 3)).sum(dim=1)
        # Summing then resizing equals resizing then summing: bilinear resizing is linear.
        if tuple(per_channel.shape[-2:]) != tuple(size):
            per_channel = F.interpolate(per_channel[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        total = total + per_channel
    return total


#: Every method, in the order pictures show them.
METHODS: dict[str, CamMethod] = {
    m.name: m
    for m in (
        CamMethod("cam", "CAM", _cam, head=True),
        CamMethod("gradcam", "Grad-CAM", _gradcam, gradients=True),
        CamMethod("gradcam++", "Grad-CAM++", _gradcam_pp, gradients=True),
        CamMethod("xgradcam", "XGrad-CAM", _xgradcam, gradients=True),
        CamMethod("hirescam", "HiRes-CAM", _hirescam, gradients=True),
        CamMethod("layercam", "Layer-CAM", _layercam, gradients=True),
        CamMethod("eigencam", "Eigen-CAM", _eigencam),
        CamMethod("eigengradcam", "EigenGrad-CAM", _eigengradcam, gradients=True),
        CamMethod("scorecam", "Score-CAM", _scorecam, forwards=True),
        CamMethod("ablationcam", "Ablation-CAM", _ablationcam, forwards=True),
        CamMethod("fullgrad", "FullGrad", _fullgrad, full_gradients=True),
    )
}


def check_methods(methods: str | object) -> tuple[str, ...]:
    """One method name or several, in the given order, once each; unknown names raise with close matches."""
    names = [methods] if isinstance(methods, str) else list(methods) if methods is not None else []
    if not names:
        raise ValueError(f"cam_methods must name at least one of {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            close = difflib.get_close_matches(str(name), list(METHODS), n=2, cutoff=0.5)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown CAM method {name!r}{hint}; expected some of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def bias_layers(net: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """``{name: (module, bias [K])}`` of every ``Conv2d`` / ``BatchNorm2d`` with a bias (FullGrad's layers);
    a BatchNorm's bias is folded with its running statistics as it acts in eval mode."""
    found = {}
    for name, m in net.named_modules():
        if type(m) is nn.Conv2d and m.bias is not None:
            found[name] = (m, m.bias.detach())
        elif type(m) is nn.BatchNorm2d and m.bias is not None:
            if m.running_mean is not None and m.running_var is not None:
                bias = m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)
            else:
                bias = m.bias
            found[name] = (m, bias.detach())
    return found


def linear_head(net: nn.Module, layer: str, module: nn.Module, x: torch.Tensor,
                output_selector=None) -> nn.Linear:
    """The linear head that CAM needs: an ``nn.Linear`` whose input is the global average of ``layer``'s output and
    whose output is the model's class scores (both checked numerically on ``x``). Raises ``ValueError`` saying why
    not and what to use instead."""
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, inputs, output, name):
        seen[name] = (inputs[0].detach(), output.detach())

    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name)) for name, m in linears.items()]
    try:
        with torch.no_grad(), capture({layer: module}, for_grad=True) as acts:
            scores = select_output(net(x), output_selector).detach()
    finally:
        for h in hooks:
            h.remove()
    why = "CAM needs global average pooling of the layer followed by one linear layer (the classifier)"
    if layer not in acts or acts[layer].dim() != 4:
        raise ValueError(f"{why}; layer {layer!r} gives no spatial map. Use method='gradcam', which needs no such head")
    pooled = acts[layer].float().mean(dim=(2, 3))
    for name, (inputs, output) in seen.items():
        # its input is the pooled map, and its output is the model's class scores (not a hidden layer of an MLP head)
        if (inputs.dim() == 2 and inputs.shape == pooled.shape
                and torch.allclose(inputs.float(), pooled, rtol=1e-4, atol=1e-5)
                and output.shape == scores.shape and torch.allclose(output.float(), scores.float(), rtol=1e-4,
                                                                    atol=1e-5)):
            return linears[name]
    found = ", ".join(linears) or "none"
    raise ValueError(f"{why}; in this model no nn.Linear takes the spatial mean of {layer!r} (linear layers: {found}). "
                     "Use method='gradcam', which needs no such head, or choose the last convolutional block")
