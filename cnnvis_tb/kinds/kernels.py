"""Kernel grids: what each convolution's filters look like (Zeiler & Fergus style).

Pixel mapping (documented so it can be checked): every weight ``w`` of a layer is drawn as
``0.5 + 0.5 * w / max|W|`` where ``max|W|`` is the largest finite magnitude in the shown weights, so 0 is
mid-grey / white and the scale is shared by all kernels of the layer (strong and weak kernels stay comparable
across kernels and across steps). Kernels with exactly 3 input channels (an RGB first layer) are drawn as
colour patches; every other kernel is drawn one input channel at a time as a heat patch in a diverging
colormap (blue < 0 < red). Non-finite weights are drawn as 0 and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_tb.kinds.base import Kind, Output, StepContext, positive_int
from cnnvis_tb.render import colorize, make_grid, to_uint8, upscale_factor

__all__ = ["kernel_grid", "KernelGrid", "render_kernels", "Kernels"]


@dataclass
class KernelGrid:
    """A rendered kernel grid and what it leaves out."""

    pixels: torch.Tensor  # [3, H, W] uint8, as logged
    shown_out: int
    total_out: int
    shown_in: int
    total_in: int
    nonfinite: int

    @property
    def image(self) -> torch.Tensor:
        """The grid as ``[3, H, W]`` float in ``[0, 1]``."""
        return self.pixels.float() / 255

    @property
    def note(self) -> str:
        parts = []
        if self.shown_out < self.total_out:
            parts.append(f"showing the first {self.shown_out} of {self.total_out} kernels")
        if self.shown_in < self.total_in:
            parts.append(f"the first {self.shown_in} of {self.total_in} input channels each")
        if self.nonfinite:
            parts.append(f"{self.nonfinite} non-finite weights drawn as 0")
        return "; ".join(parts)


@torch.no_grad()
def render_kernels(
    weight: torch.Tensor, *, max_kernels: int = 64, max_in_channels: int = 16, min_tile: int = 16, padding: int = 1
) -> KernelGrid:
    """Render a ``[O, I, kh, kw]`` weight as a grid; see the module docs for the pixel mapping.

    RGB kernels (``I == 3``) and single-channel kernels (``I == 1``: grayscale input, depthwise convolutions)
    are laid out in a near-square grid, one tile per kernel. Other kernels get one row per output channel
    and one column per input channel; many rows are wrapped into side-by-side blocks (one white tile apart) so the
    grid stays near square. Tiles are enlarged with nearest-neighbour by an integer factor so the
    shorter side is at least ``min_tile`` pixels.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"kernel weight must be [out, in, kh, kw], got {shape}")
    if max_kernels < 1 or max_in_channels < 1:
        raise ValueError("max_kernels and max_in_channels must be >= 1")
    total_out, total_in = weight.shape[:2]
    rgb = total_in == 3
    shown_in = total_in if rgb else min(total_in, max_in_channels)
    w = weight.detach()[:max_kernels, :shown_in].float().cpu()
    finite = torch.isfinite(w)
    nonfinite = int((~finite).sum())
    w = torch.where(finite, w, torch.zeros_like(w))
    scale = w.abs().max().clamp_min(1e-12)
    values = 0.5 + 0.5 * w / scale  # [O, I, kh, kw] in [0, 1]
    if rgb:
        tiles, ncol = values, None
    else:
        o, i, kh, kw = values.shape
        tiles = colorize(values.reshape(o * i, kh, kw), "rdbu")  # [O*I, 3, kh, kw], row-major: out, then in
        ncol = None if i == 1 else i
        if i > 1:
            tiles, ncol = _wrap_rows(tiles, o, i)
    # Quantized before enlarging: the grid (up to ~1000 x 300 px) is laid out in bytes, not floats.
    factor = upscale_factor(*tiles.shape[-2:], min_tile)
    grid = make_grid(to_uint8(tiles), ncol=ncol, padding=padding, pad_value=255, factor=factor)
    return KernelGrid(grid, w.shape[0], total_out, shown_in, total_in, nonfinite)


def _wrap_rows(tiles: torch.Tensor, o: int, i: int) -> tuple[torch.Tensor, int]:
    """Rows of ``i`` tiles (one per output kernel) wrapped into side-by-side blocks, so a deep layer's grid is near
    square instead of a tall strip: kernel ``k`` sits in block ``k // rows``, row ``k % rows``; one white tile
    separates the blocks. Returns the tiles in row-major order and the column count."""
    blocks = max(1, round(math.sqrt(o / (i + 1))))
    if blocks == 1:
        return tiles, i
    rows = math.ceil(o / blocks)
    shape = tiles.shape[1:]
    blank = torch.ones((1, 1, *shape), dtype=tiles.dtype)
    kernels = torch.cat([tiles.view(o, i, *shape), blank.expand(rows * blocks - o, i, *shape)])  # [blocks*rows, i]
    by_row = kernels.view(blocks, rows, i, *shape).transpose(0, 1)  # [rows, blocks, i, ...]: kernel b*rows + r
    with_gap = torch.cat([by_row, blank[None].expand(rows, blocks, 1, *shape)], dim=2)  # a white tile after each
    ordered = with_gap.reshape(rows, blocks * (i + 1), *shape)[:, :-1]  # ... but the last block of a row
    return ordered.reshape(-1, *shape), blocks * (i + 1) - 1


def kernel_grid(
    layer: nn.Module | torch.Tensor, *, max_kernels: int = 64, max_in_channels: int = 16, min_tile: int = 16
) -> torch.Tensor:
    """Picture of a convolution's kernels: ``[3, H, W]`` float in ``[0, 1]``.

    Args:
        layer: an ``nn.Conv2d`` (grouped and depthwise convolutions included) or its ``[O, I, kh, kw]`` weight.
        max_kernels: at most this many output kernels are drawn (the first ones).
        max_in_channels: for non-RGB kernels, at most this many input channels per kernel.
        min_tile: shorter side of a tile in pixels (nearest-neighbour enlargement by an integer factor).
    """
    weight = layer.weight if isinstance(layer, nn.Module) else layer
    return render_kernels(
        weight, max_kernels=max_kernels, max_in_channels=max_in_channels, min_tile=min_tile
    ).image


class Kernels(Kind):
    """The ``kernels`` kind: a kernel grid per chosen convolution (``cnnvis/kernels/<layer>/grid``); what a grid
    leaves out (kernels past ``max_kernels``, input channels, non-finite weights) is noted once as text."""

    name, label, every = "kernels", "Kernels", 100
    layer_role = "conv"
    log_in_background = True  # log draws the copies compute took

    def __init__(self, *, max_kernels: int = 64, every: int | None = None, layers=None) -> None:
        super().__init__(every=every, layers=layers)
        self.max_kernels = positive_int("max_kernels", max_kernels)
        self._noted: set[str] = set()

    @classmethod
    def from_options(cls, options):
        return cls(max_kernels=options.get("max_kernels", 64))

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> tuple[list[str], dict[str, tuple[object, tuple[int, int] | None]]]:
        """The layers still in the model and a copy of the part of each weight a grid shows (the next optimizer step
        changes the weights in place), with the weight's ``(out, in)`` kernel counts."""
        modules = dict(ctx.net.named_modules())
        present = self.present_layers(ctx.net)
        weights: dict[str, tuple[object, tuple[int, int] | None]] = {}
        for layer in present:
            weight = getattr(modules[layer], "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 4:
                total_out, total_in = weight.shape[:2]
                shown_in = total_in if total_in == 3 else min(total_in, 16)
                weights[layer] = (weight.detach()[: self.max_kernels, :shown_in].clone(), (total_out, total_in))
            else:  # render_kernels names what is wrong with it
                weights[layer] = (weight.detach().clone() if isinstance(weight, torch.Tensor) else weight, None)
        return present, weights

    def log(self, ctx: StepContext, out: Output, computed) -> None:
        present, weights = computed
        for layer in self.each_present(present):
            weight, totals = weights[layer]
            grid = render_kernels(weight, max_kernels=self.max_kernels)
            if totals is not None:
                grid.total_out, grid.total_in = totals
            if grid.nonfinite:
                ctx.warn_once(f"nonfinite-kernels-{layer}", f"{grid.nonfinite} weights of {layer!r} are NaN or inf")
            out.image(layer, "grid", grid.pixels)
            if grid.note and layer not in self._noted:
                self._noted.add(layer)
                out.text(layer, f"{layer}: {grid.note}")
