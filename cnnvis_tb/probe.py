"""The probe: a fixed batch of images (and labels) that every logging step looks at, so steps compare."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Probe", "load_probe", "check_channels", "check_annotations"]


@dataclass
class Probe:
    """``images [N, C, H, W]`` as the model sees them (float, CPU, our own copy) and optional ``labels [N]``."""

    images: torch.Tensor
    labels: torch.Tensor | None
    boxes: torch.Tensor | None = None  # [N, 4] float (x0, y0, x1, y1) in input pixels
    masks: torch.Tensor | None = None  # [N, H, W] bool

    def __len__(self) -> int:
        return self.images.shape[0]


def _shape(x: object) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _from_dataset(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First ``count`` samples of a map-style dataset, read with every RNG put back afterwards (random
    augmentations of the dataset must not consume the training run's random numbers)."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            "probe must be a tensor [N, C, H, W], a map-style Dataset or a DataLoader over one; "
            f"got {type(dataset).__name__}"
        )
    n = min(count, len(dataset))
    if n == 0:
        raise ValueError("probe dataset is empty; give at least one image")
    py_state, np_state = random.getstate(), np.random.get_state()
    images, labels = [], []
    with torch.random.fork_rng(devices=[]):
        try:
            for i in range(n):
                sample = dataset[i]
                if isinstance(sample, (tuple, list)):
                    images.append(sample[0])
                    labels.append(sample[1] if len(sample) > 1 else None)
                else:
                    images.append(sample)
                    labels.append(None)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    if not all(isinstance(x, torch.Tensor) for x in images):
        raise TypeError(
            f"probe dataset returned {type(images[0]).__name__} images; add a ToTensor() (and Normalize) transform"
        )
    stacked = torch.stack([x.detach() for x in images])
    if any(lab is None for lab in labels):
        return stacked, None
    return stacked, torch.as_tensor([int(lab) for lab in labels])


def check_channels(images: torch.Tensor, in_channels: int) -> None:
    """The probe must have as many channels as the model's first convolution takes."""
    if images.shape[1] != in_channels:
        raise ValueError(
            f"probe has {images.shape[1]} channels but the model's first convolution expects {in_channels}: "
            f"expected [N, {in_channels}, H, W], got {_shape(images)}"
        )


def load_probe(
    probe: object,
    probe_labels: Sequence[int] | torch.Tensor | None,
    *,
    max_images: int,
    in_channels: int | None = None,
) -> Probe:
    """Validate and copy the probe; raise early with what was expected and what was given.

    ``probe`` is a tensor ``[N, C, H, W]`` (all N images are used), or a Dataset / DataLoader whose first
    ``max_images`` samples are taken in index order (no shuffling, no worker, no RNG consumed).
    """
    labels_from_data = None
    if isinstance(probe, torch.Tensor):
        images = probe
    elif isinstance(probe, torch.utils.data.DataLoader):
        images, labels_from_data = _from_dataset(probe.dataset, max_images)
    elif probe is None:
        raise ValueError("probe is required: a tensor [N, C, H, W] of images as the model sees them, or a Dataset")
    else:
        images, labels_from_data = _from_dataset(probe, max_images)

    if images.dim() != 4:
        fix = " (one image? use probe.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"probe must be [N, C, H, W]; got shape {_shape(images)}{fix}")
    if images.shape[0] == 0:
        raise ValueError("probe is empty: expected [N, C, H, W] with N >= 1, got N = 0")
    if not images.is_floating_point():
        raise TypeError(
            f"probe must be a floating-point tensor as the model sees it, got dtype {images.dtype}; "
            "convert with images.float() / 255 and apply the model's normalization"
        )
    if images.device.type == "meta":
        raise ValueError("probe is on the 'meta' device and holds no data; pass real images")
    if in_channels is not None:
        check_channels(images, in_channels)
    if not torch.isfinite(images).all():
        raise ValueError("probe contains NaN or infinite values")
    images = images.detach().to("cpu", torch.float32).clone()

    labels = probe_labels if probe_labels is not None else labels_from_data
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu().flatten()
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"probe_labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() != images.shape[0]:
            raise ValueError(
                f"probe_labels must give one class per probe image: expected {images.shape[0]}, got {labels.numel()}"
            )
        labels = labels.long().clone()
    return Probe(images, labels)


def check_annotations(probe: Probe, boxes: object = None, masks: object = None) -> Probe:
    """``probe`` with its object ``boxes [N, 4]`` (``x0, y0, x1, y1`` in input pixels, ``x0 < x1``, ``y0 < y1``, inside
    the image) and/or ``masks [N, H, W]`` (bool, the input's size), checked; raises ``ValueError`` naming the
    problem."""
    n, _, h, w = probe.images.shape
    if boxes is not None:
        if isinstance(boxes, torch.Tensor):
            b = boxes.detach().float().cpu()
        else:
            b = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"probe_boxes must be [N, 4] as (x0, y0, x1, y1), got shape {list(b.shape)}")
        if b.shape[0] != n:
            raise ValueError(f"probe_boxes must give one box per probe image: expected {n}, got {b.shape[0]}")
        bad = torch.nonzero((b[:, 0] >= b[:, 2]) | (b[:, 1] >= b[:, 3]))[:, 0].tolist()
        if bad:
            raise ValueError(f"probe_boxes {bad} have x0 >= x1 or y0 >= y1; boxes are (x0, y0, x1, y1)")
        outside = torch.nonzero((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h))[:, 0].tolist()
        if outside:
            raise ValueError(f"probe_boxes {outside} reach outside the {w}x{h} image (x in 0..{w}, y in 0..{h})")
        probe = Probe(probe.images, probe.labels, b, probe.masks)
    if masks is not None:
        m = torch.as_tensor(masks).detach().cpu()
        if m.dim() != 3 or tuple(m.shape) != (n, h, w):
            raise ValueError(f"probe_masks must be [N, H, W] = [{n}, {h}, {w}] (one mask per probe image, the input's "
                             f"size), got {list(m.shape)}")
        probe = Probe(probe.images, probe.labels, probe.boxes, m.bool())
    return probe
