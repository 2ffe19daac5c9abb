"""Feature maps: what chosen layers compute for each probe image, through temporary forward hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb.layers import resolve_layer, unwrap_model
from cnnvis_tb.render import caption, colorize, fit, make_grid
from cnnvis_tb.safety import capture, model_device, model_dtype, preserved

__all__ = ["feature_maps", "top_channels", "feature_panel"]


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
    indices, _ = top_channels(activation[None], k)
    idx = indices[0]
    maps = activation.float()[idx]  # [k, h, w]
    lo, hi = maps.min(), maps.max()
    maps = (maps - lo) / (hi - lo).clamp_min(1e-8)
    tiles = fit(colorize(maps, "viridis"), min_tile, max_tile)
    size = tiles.shape[-2:]
    picture = image.float().cpu()
    picture = picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture[:3]
    picture = F.interpolate(picture[None], size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    grid = make_grid(torch.cat([picture, tiles.cpu()]), ncol=min(9, len(idx) + 1), padding=2)
    return caption(grid, ["top channels: " + " ".join(str(int(i)) for i in idx)])
