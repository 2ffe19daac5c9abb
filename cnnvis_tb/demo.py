"""Offline demo material: a generated shapes dataset with known object boxes and a small CNN.

Nothing is downloaded. ``ShapesDataset`` draws coloured circles, squares, triangles and crosses at random
positions and sizes over noisy backgrounds; the class is the shape, so a correct Grad-CAM points at the object,
whose box is known (``dataset.boxes``). Used by ``examples/train_shapes.py``, the tests and the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLASSES", "MEAN", "STD", "ShapesDataset", "SmallCNN", "make_shapes", "norm_stats"]

CLASSES = ("circle", "square", "triangle", "cross")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def make_shapes(
    count: int, size: int = 32, *, seed: int = 0, channels: int = 3, height: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate ``count`` images: ``(images [N, C, H, W] in [0, 1], labels [N], boxes [N, 4] as x0, y0, x1, y1)``.

    ``size`` is the width (and height unless ``height`` is given). Deterministic for a given ``seed``; uses its
    own generator, never the global RNG.
    """
    h, w = (height or size), size
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (count,), generator=g)
    short = min(h, w)
    radius = (torch.rand(count, generator=g) * 0.17 + 0.13) * short  # 13%..30% of the shorter side
    cx = radius + torch.rand(count, generator=g) * (w - 2 * radius)
    cy = radius + torch.rand(count, generator=g) * (h - 2 * radius)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    masks = torch.stack(
        [
            dx * dx + dy * dy <= r * r,
            torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r,
            (dy.abs() <= 0.85 * r) & (dx.abs() <= (dy + 0.85 * r) * 0.6),
            ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
        ],
        dim=1,
    )[torch.arange(count), labels].float()  # [N, H, W]
    background = torch.rand((count, channels, 1, 1), generator=g) * 0.5 + 0.1
    colour = torch.rand((count, channels, 1, 1), generator=g)
    # Keep the shape visible: push its colour away from the background's.
    colour = torch.where((colour - background).abs() < 0.35, (background + 0.5) % 1.0, colour)
    noise = torch.randn((count, channels, h, w), generator=g) * 0.08
    images = (background + noise) * (1 - masks[:, None]) + (colour + noise * 0.5) * masks[:, None]
    boxes = torch.stack([cx - radius, cy - radius, cx + radius, cy + radius], dim=1)
    return images.clamp(0, 1), labels, boxes


def norm_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel used to normalize the shapes (the same value for every channel)."""
    return (MEAN[0],) * channels, (STD[0],) * channels


class ShapesDataset(torch.utils.data.Dataset):
    """Generated shapes, normalized with :data:`MEAN` / :data:`STD`; items are ``(image [C, H, W], label)``."""

    def __init__(self, count: int = 4096, size: int = 32, *, seed: int = 0, channels: int = 3):
        images, self.labels, self.boxes = make_shapes(count, size, seed=seed, channels=channels)
        self.mean, self.std = norm_stats(channels)
        self.images = (images - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        self.classes = CLASSES

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks, dropout and a linear head over global average pooling."""

    def __init__(self, in_channels: int = 3, num_classes: int = len(CLASSES), width: int = 16, dropout: float = 0.2):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width, 1),
            block(width, width * 2, 2),
            block(width * 2, width * 4, 2),
            block(width * 4, width * 4, 1),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(self.dropout(x))
