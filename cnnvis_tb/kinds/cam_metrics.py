"""Explanation quality as numbers: how well a CAM map points at the object, how focused and how stable it is.

Every function takes maps ``[N, H, W]`` at the input's resolution, non-negative (ReLU'd, not min-max scaled), and
returns one value per image ``[N]``:

* :func:`pointing` (Zhang et al.): 1 when the map's maximum lies inside the object, else 0. Ties are broken by
  ``argmax`` order (the first maximum in row-major order); a constant map (no maximum at all, e.g. all zero) is a
  miss. No tolerance margin: at 32–64 px the original 15 px would cover most objects.
* :func:`energy` (the Score-CAM paper's energy-based pointing): the share of the map's mass inside the object (0 for
  an all-zero map).
* :func:`entropy`: the map's Shannon entropy as a distribution over pixels, divided by ``log(H·W)``: 0 = all mass on
  one pixel, 1 = spread evenly (an all-zero map counts as 1).
* :func:`spearman`: the rank correlation of each image's map with another map of it (the previous logging step's:
  stability); ties are ranked in index order.
* :func:`top_iou`: the intersection over union of the map's top area (its :data:`TOP_AREA` = 15 % highest pixels)
  with the object.
* :func:`deletion_insertion` (RISE, Petsiuk et al. 2018): the areas under the curves of the target's softmax
  probability while the map's pixels, most important first, are deleted (replaced by a baseline) or inserted (into a
  blurred copy, :func:`blur`). Unlike the others it runs the model: a few batched no-grad forwards.

The object is :func:`regions` of the probe's boxes (pixels whose centre lies inside) or masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "regions",
    "pointing",
    "energy",
    "entropy",
    "spearman",
    "top_iou",
    "TOP_AREA",
    "DELETION_STEPS",
    "blur",
    "blur_sigma",
    "perturbation_counts",
    "deletion_insertion",
]

#: Share of the image the map's top area covers in :func:`top_iou`.
TOP_AREA = 0.15
#: Points of a deletion / insertion curve besides its start (each step perturbs ``ceil(H·W / steps)`` more pixels).
DELETION_STEPS = 8


def regions(boxes: torch.Tensor | None, masks: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """``[N, H, W]`` bool: the masks, else the pixels whose centre lies inside each box; None without either."""
    if masks is not None:
        return masks.bool()
    if boxes is None:
        return None
    h, w = size
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    b = boxes.float().view(-1, 4, 1, 1)
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


def pointing(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    hit = region.flatten(1).to(flat.device).gather(1, flat.argmax(dim=1, keepdim=True))[:, 0]
    constant = flat.amax(dim=1) <= flat.amin(dim=1)
    return (hit & ~constant).float()


def energy(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1).float()
    total = flat.sum(dim=1)
    inside = (flat * region.flatten(1).to(flat.device)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def entropy(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1).float()
    total = flat.sum(dim=1, keepdim=True)
    p = flat / total.clamp_min(1e-30)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1) / math.log(flat.shape[1])
    return torch.where(total[:, 0] > 0, h, torch.ones_like(h)).float()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ordinal ranks along dim 1 (ties in order of position): one sort, its permutation inverted by a scatter."""
    order = x.argsort(dim=1, stable=True)
    positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
    return torch.empty(x.shape, device=x.device, dtype=torch.float32).scatter_(1, order, positions)


def rank_vectors(maps: torch.Tensor) -> torch.Tensor:
    """Each map's ranks ``[N, P]`` centred and scaled to unit length: the Spearman correlation of two maps is then
    the dot product of their rank vectors (:func:`spearman_of_ranks`), so a map is sorted once however often it is
    compared (with the previous step's map, with the other methods' maps)."""
    r = _ranks(maps.flatten(1).float())
    r = r - r.mean(dim=1, keepdim=True)
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)


def spearman_of_ranks(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation ``[N]`` of two :func:`rank_vectors`."""
    return (ra * rb.to(ra.device)).sum(dim=1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-map Spearman rank correlation ``[N]`` of two map sets (ordinal ranks: ties in order of position)."""
    return spearman_of_ranks(rank_vectors(a), rank_vectors(b.to(a.device)))


def top_iou(maps: torch.Tensor, region: torch.Tensor, fraction: float = TOP_AREA) -> torch.Tensor:
    """Intersection over union of each map's top area with the object ``region`` ``[N, H, W]``.

    The top area is the ``ceil(fraction · H·W)`` highest pixels of the map (ties in row-major order), leaving out the
    pixels at the map's minimum (they carry no evidence; a map positive on fewer pixels has a smaller top area), so a
    constant map has none and scores 0. 0 also when the top area and the object are both empty."""
    flat = maps.flatten(1).float()
    k = max(1, math.ceil(fraction * flat.shape[1]))
    order = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    top = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True) & (flat > flat.amin(dim=1, keepdim=True))
    obj = region.flatten(1).to(flat.device).bool()
    inter = (top & obj).sum(dim=1).float()
    union = (top | obj).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def blur_sigma(size: tuple[int, int]) -> float:
    """The default blur of :func:`blur` for ``(H, W)`` images: a Gaussian of σ = 1/16 of the shorter side, at least 1
    pixel (2 px at 32², 14 px at 224²)."""
    return max(1.0, min(size) / 16)


def blur(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` blurred by a Gaussian of ``sigma`` pixels (default :func:`blur_sigma`) per channel,
    truncated at 3σ, edges replicated: the start of the insertion curve (RISE's blurred substrate)."""
    h, w = images.shape[-2:]
    sigma = blur_sigma((h, w)) if sigma is None else float(sigma)
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = images.float()
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )
    return x.to(images.dtype)


def perturbation_counts(pixels: int, steps: int = DELETION_STEPS) -> list[int]:
    """How many pixels are perturbed at each point of a deletion / insertion curve: ``0, s, 2s, ... , pixels`` with
    ``s = ceil(pixels / steps)`` (the last step may be shorter; as torch-cam's ``DeletionInsertionMetric``)."""
    size = -(-pixels // steps)
    return [*range(0, pixels, size), pixels]


def deletion_insertion(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    owner: torch.Tensor | None = None,
    steps: int = DELETION_STEPS,
    baseline: float | torch.Tensor = 0.0,
    start: torch.Tensor | None = None,
    batch_size: int = 64,
    image_probs: torch.Tensor | None = None,
    curves: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Deletion and insertion AUC (RISE, Petsiuk et al. 2018) of each map ``[M, H, W]``: the lower the deletion AUC
    and the higher the insertion AUC, the better the map ranks the pixels the model's decision rests on.

    The pixels are ranked by decreasing map value (ties in row-major order) and perturbed in ``steps`` groups of
    ``ceil(H·W / steps)`` (:func:`perturbation_counts`), all channels of a pixel together. Deletion replaces the
    first ``k`` pixels of the image by ``baseline`` (in the model's input space: 0 is the dataset mean under mean/std
    normalization); insertion puts them into ``start`` (default :func:`blur` of the image) — so the deletion curve
    runs from the image to the baseline image and the insertion curve from the blurred image to the image. Each
    curve is the target's probability ``predict(x)[class]`` at every point, its AUC the trapezoid rule over the
    perturbed fraction ``k / (H·W)`` in ``[0, 1]`` (so within ``[0, 1]`` for probabilities).

    Args:
        predict: ``[B, C, H, W]`` → class probabilities ``[B, classes]`` (e.g. the softmax of the model's scores);
            called without gradients, on at most ``batch_size`` images at a time.
        images: ``[N, C, H, W]`` as the model sees them.
        maps: ``[M, H, W]`` at the images' resolution; row ``m`` explains image ``owner[m]`` for ``classes[m]``.
        classes: ``[M]`` the target class of each map.
        owner: ``[M]`` image of each map (default: map ``m`` explains image ``m``).
        baseline: a number or a tensor broadcastable to ``images``.
        start: ``[N, C, H, W]`` where insertion starts (default ``blur(images)``).
        image_probs: ``predict(images)`` when already known (the curves' shared end points).
        curves: also return the fractions ``[S + 1]`` and the curves ``[M, S + 1]``.

    Returns:
        ``(deletion [M], insertion [M])``, or with ``curves=True`` ``(deletion, insertion, fractions,
        deletion_curves, insertion_curves)``. Forwards: ``2·N`` end-point images (baseline, start) plus
        ``2·(S − 1)`` per map, in ``ceil(total / batch_size)`` passes.
    """
    for value, what in ((steps, "steps"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    n, _, h, w = images.shape
    m = maps.shape[0]
    device = images.device
    owner = torch.arange(n, device=device) if owner is None else owner.to(device).long()
    classes = classes.to(device).long()
    if m != owner.numel() or m != classes.numel() or tuple(maps.shape[-2:]) != (h, w):
        raise ValueError(
            f"maps [M, {h}, {w}], classes [M] and owner [M] must match: got maps {list(maps.shape)}, "
            f"{classes.numel()} classes, {owner.numel()} owners"
        )
    counts = perturbation_counts(h * w, steps)
    inner = torch.tensor(counts[1:-1], device=device)
    fractions = torch.tensor(counts, dtype=torch.float32) / (h * w)
    base = torch.as_tensor(baseline, dtype=images.dtype, device=device).broadcast_to(images.shape)
    start = blur(images) if start is None else start.to(device=device, dtype=images.dtype)
    ranks = maps.to(device).flatten(1).float().argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    with torch.no_grad():
        if image_probs is None:
            image_probs = torch.cat([predict(images[i : i + batch_size]).float() for i in range(0, n, batch_size)])
        ends = []  # predict(baseline) and predict(start) of every image: [2N, classes]
        points = torch.empty(m * len(inner) * 2, dtype=torch.float32, device=device)
        total = 2 * n + points.numel()
        for a in range(0, total, batch_size):
            job = torch.arange(a, min(a + batch_size, total), device=device)
            parts = []
            end = job[job < 2 * n]
            if end.numel():
                parts.append(torch.where((end < n).view(-1, 1, 1, 1), base[end % n], start[end % n]))
            k = job[job >= 2 * n] - 2 * n
            if k.numel():
                row, point, insert = k // (2 * len(inner)), (k // 2) % len(inner), (k % 2).bool()
                top = (ranks[row] < inner[point, None]).view(-1, 1, h, w)
                image = images[owner[row]]
                deleted = torch.where(top, base[owner[row]], image)
                inserted = torch.where(top, image, start[owner[row]])
                parts.append(torch.where(insert.view(-1, 1, 1, 1), inserted, deleted))
            probs = predict(torch.cat(parts)).float()
            if end.numel():
                ends.append(probs[: end.numel()])
            if k.numel():
                points[k] = probs[end.numel() :].gather(1, classes[row][:, None])[:, 0]
    ends = torch.cat(ends)
    full = image_probs.to(device).float()[owner].gather(1, classes[:, None])[:, 0]
    at_base = ends[:n][owner].gather(1, classes[:, None])[:, 0]
    at_start = ends[n:][owner].gather(1, classes[:, None])[:, 0]
    points = points.view(m, len(inner), 2)
    deletion = torch.cat([full[:, None], points[..., 0], at_base[:, None]], dim=1).cpu()
    insertion = torch.cat([at_start[:, None], points[..., 1], full[:, None]], dim=1).cpu()
    d_auc, i_auc = torch.trapezoid(deletion, fractions, dim=1), torch.trapezoid(insertion, fractions, dim=1)
    if curves:
        return d_auc, i_auc, fractions, deletion, insertion
    return d_auc, i_auc
