"""Feature maps: what chosen layers compute for each probe image, through temporary forward hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.hooks import capture
from cnnvis_tb.kinds.base import Kind, Needs, Output, StepContext, positive_int
from cnnvis_tb.layers import resolve_layer, unwrap_model
from cnnvis_tb.render import as_rgb, captions, colorize_uint8, fit, grid_boxes, make_grids, to_uint8, upscale_factor
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = ["feature_maps", "top_channels", "feature_panel", "feature_panels", "Features"]


@torch.no_grad()
def feature_maps(model: nn.Module, images: torch.Tensor, layers: Sequence[str | nn.Module]) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` for ``images`` (``[N, C, H, W]`` as the model sees them): ``{name: [N, K, h, w]}``.

    Hooks are attached only for this one forward pass (in eval mode) and removed afterwards; each output is
    copied when the layer produces it, so an in-place op after the layer does not change what is returned.
    Layers with tuple/dict outputs report their first 4-D tensor.
    """
    net = unwrap_model(model)
    resolved = dict(resolve_layer(net, layer) for layer in layers)
    with preserved(net), torch.no_grad():
        with capture(resolved) as acts:
            net(images.detach().to(device=model_device(net), dtype=model_dtype(net)))
    missing = [name for name in resolved if name not in acts]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the forward pass")
    return {name: acts[name].float() for name in resolved}


def top_channels(activations: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most active channels of each image: ``(indices [N, k], mean activation [N, k])``.

    Activity is the spatial mean of the channel's map; ``k`` is capped at the number of channels.
    """
    if activations.dim() != 4:
        raise ValueError(f"activations must be [N, K, h, w], got shape {tuple(activations.shape)}")
    activity = activations.float().mean(dim=(2, 3))
    values, indices = activity.topk(min(k, activity.shape[1]), dim=1)
    return indices, values


@torch.no_grad()
def feature_panel(
    image: torch.Tensor, activation: torch.Tensor, k: int = 8, min_tile: int = 48, max_tile: int = 48
) -> torch.Tensor:
    """One probe image's picture: the image, then its ``k`` most active channels as viridis heat tiles.

    ``image`` is ``[C, H, W]`` in ``[0, 1]``, ``activation`` ``[K, h, w]``. The tiles share one scale (the
    min and max over the shown maps), so a strong channel looks stronger than a weak one. Tiles are enlarged to
    ``min_tile`` or shrunk to ``max_tile`` pixels (see :func:`cnnvis_tb.render.fit`). Returns ``[3, H', W']``.
    """
    return feature_panels(image[None], activation[None], k, min_tile, max_tile)[0]


@torch.no_grad()
def feature_panels(
    images: torch.Tensor, activations: torch.Tensor, k: int = 8, min_tile: int = 48, max_tile: int = 48
) -> list[torch.Tensor]:
    """:func:`feature_panel` for a batch (``images [N, C, H, W]``, ``activations [N, K, h, w]``), rendered
    together: one top-k, one colormap lookup and one grid layout for all N pictures."""
    return [picture.float() / 255 for picture in _feature_panels(images, activations, k, min_tile, max_tile)[0]]


def _feature_panels(images, activations, k, min_tile, max_tile) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The pictures of :func:`feature_panels`, in bytes (``uint8 [3, H', W']``, what is logged), and each one's
    panel records (the input, then the channels by rank: keys ``input``, ``top_1`` … with the channel number as
    text). Built in bytes from the small maps on: maps larger than ``max_tile`` are shrunk (area averaging of the
    scaled values), coloured by table lookup (:func:`cnnvis_tb.render.colorize_uint8`), enlarged by nearest
    neighbour to ``min_tile``, laid out and captioned, four times fewer bytes moved than in floats."""
    indices, _ = top_channels(activations, k)  # [N, k]
    n, kept = indices.shape
    h, w = activations.shape[-2:]
    maps = activations.float().gather(1, indices[:, :, None, None].expand(n, kept, h, w))  # [N, k, h, w]
    lo = maps.amin(dim=(1, 2, 3), keepdim=True)
    hi = maps.amax(dim=(1, 2, 3), keepdim=True)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-8)).cpu()
    shrink = min(h, w) >= min_tile and max(h, w) > max_tile  # as fit() decides: shrunk before, enlarged after colouring
    tiles = colorize_uint8((fit(maps, min_tile, max_tile) if shrink else maps).flatten(0, 1), "viridis")
    factor = 1 if shrink else upscale_factor(h, w, min_tile)
    size = (tiles.shape[-2] * factor, tiles.shape[-1] * factor)
    # The tiles enlarged as they are placed, after a blank cell where the input goes (then drawn at the tiles' size)
    cells = torch.cat([tiles.new_empty((n, 1, 3, *tiles.shape[-2:])), tiles.view(n, kept, 3, *tiles.shape[-2:])], 1)
    ncol = min(9, kept + 1)
    grids = make_grids(cells, ncol=ncol, padding=2, pad_value=255, factor=factor)
    boxes = grid_boxes(kept + 1, ncol, size, padding=2)
    x, y, bw, bh = boxes[0]
    pictures = as_rgb(images.float().cpu())[:, :3]
    grids[:, :, y : y + bh, x : x + bw] = to_uint8(F.interpolate(pictures, size=size, mode="bilinear",
                                                                 align_corners=False))
    lines = [["top channels: " + ", ".join(str(int(i)) for i in idx)] for idx in indices.tolist()]
    grids = captions(grids, lines)
    pictures, records = [], []
    for grid, idx in zip(grids, indices.tolist(), strict=True):
        pictures.append(grid)
        records.append([{"key": "input", "label": "input", "box": boxes[0], "text": ["input"]}] + [
            {"key": f"top_{r + 1}", "label": f"top channel {r + 1}", "box": boxes[r + 1],
             "text": [f"channel {c}", f"rank {r + 1}"]}
            for r, c in enumerate(idx)])
    return pictures, records


class Features(Kind):
    """The ``features`` kind: for each chosen layer and probe image, the image and its ``top_k`` most active
    channels (``cnnvis/features/<layer>/probe_<i>``), from the shared forward pass."""

    name, label, every = "features", "Feature maps", 200
    log_in_background = True  # log reads the probe pass's detached activations only

    def __init__(self, *, top_k: int = 8, every: int | None = None, layers=None) -> None:
        super().__init__(every=every, layers=layers)
        self.top_k = positive_int("top_k", top_k)

    @classmethod
    def from_options(cls, options):
        return cls(top_k=options.get("top_k", 8))

    def needs(self) -> Needs:
        return Needs(activations=tuple(self.layers))

    def compute(self, ctx: StepContext) -> list[str]:
        """The layers still in the model, each checked here (on the training thread, so a bad layer fails at its
        step also with asynchronous logging)."""
        present = self.present_layers(ctx.net)
        for layer in present:
            acts = ctx.shared.activations.get(layer)
            if acts is None:
                raise RuntimeError(f"layer {layer!r} did not run in the forward pass")
            if acts.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs {tuple(acts.shape)}, not a feature map [N, C, H, W]")
        return present

    def log(self, ctx: StepContext, out: Output, computed: list[str]) -> None:
        for layer in self.each_present(computed):
            acts = ctx.shared.activations[layer]
            if not torch.isfinite(acts).all():
                ctx.warn_once(f"nonfinite-features-{layer}", f"feature maps of {layer!r} hold NaN or inf values")
            pictures, records = _feature_panels(ctx.shown, acts.float().cpu(), self.top_k, 48, 48)
            for i, (panel, panels) in enumerate(zip(pictures, records, strict=True)):
                out.image(layer, tags.probe_view(i), panel, panels)
