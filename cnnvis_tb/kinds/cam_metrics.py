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

The object is :func:`regions` of the probe's boxes (pixels whose centre lies inside) or masks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["regions", "pointing", "energy", "entropy", "spearman"]


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
    return x.argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = _ranks(a.flatten(1)), _ranks(b.flatten(1).to(a.device))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return ((ra * rb).sum(dim=1) / den).float()
