"""Feature maps: the logged panels show each image's most active channels, hooks only during the pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import TinyCNN, hook_counts, image_at, make_batch, read_events, tiny_logger
from torch import nn

from cnnvis_tb import VisLogger, colorize, feature_maps
from cnnvis_tb.kinds.features import feature_panel, top_channels
from cnnvis_tb.render import to_uint8

TILE, PAD = 48, 2  # feature tiles are 48 px, 2 px apart


class Detectors(nn.Module):
    """A 1×1 convolution over 3 colour channels into 5 channels, then a classifier: which channels are the most
    active depends on each image's colours."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([
                [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [-1.0, 0.2, 0.3],
            ])[..., None, None])
            self.conv.bias.zero_()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _colour_images() -> torch.Tensor:
    """Two 12×12 images with textured colour planes: image 0 mostly blue, image 1 mostly red."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 12, 12, generator=g)
    images[0] *= torch.tensor([0.2, 0.6, 1.4]).view(3, 1, 1)
    images[1] *= torch.tensor([1.4, 0.8, 0.1]).view(3, 1, 1)
    return images


def _layer_output(model: nn.Module, images: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """What ``layer`` produces for ``images`` in eval mode, recorded by a hook of the test's own."""
    seen = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.update(out=out.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return seen["out"]


def test_logged_panel_tiles_are_the_most_active_channels_in_order(tmp_path):
    model = Detectors()
    images = _colour_images()
    k = 3
    with VisLogger(model, tmp_path, probe=images, kinds=["features"], every=1, top_k=k, strict=True,
                   layers={"features": ["conv"]}) as vis:
        vis.step(0)
    acc = read_events(tmp_path)

    maps = _layer_output(model, images, model.conv)  # [2, 5, 12, 12]
    means = maps.mean(dim=(2, 3))
    order = means.argsort(dim=1, descending=True)[:, :k]  # the test's own ranking
    assert order[0, 0] != order[1, 0]  # the images rank their channels differently: no fixed order can pass
    assert (means.gather(1, order).diff(dim=1) < -1e-3).all()  # and the ranking is unambiguous

    for i in range(2):
        panel = image_at(acc, f"cnnvis/features/conv/probe_{i:03d}").astype(int)
        assert panel.shape[1] == PAD + (k + 1) * (TILE + PAD)  # input + k channels
        shown = maps[i, order[i]]  # the tiles share one scale: min and max over the shown maps
        scaled = (shown - shown.min()) / (shown.max() - shown.min())
        for rank in range(k):
            left = PAD + (rank + 1) * (TILE + PAD)  # tile 0 is the input image
            tile = panel[PAD : PAD + TILE, left : left + TILE]
            colours = to_uint8(colorize(scaled[rank], "viridis")).permute(1, 2, 0).numpy().astype(int)
            expected = colours.repeat(TILE // 12, axis=0).repeat(TILE // 12, axis=1)  # 12 px maps, ×4 nearest
            assert np.abs(tile - expected).max() <= 1, f"image {i}: tile {rank + 1} is not channel {order[i, rank]}"
        # and the first tile is not what any other channel would look like on that scale
        first = panel[PAD : PAD + TILE, PAD + TILE + PAD : PAD + 2 * TILE + PAD]
        for other in range(1, k):
            colours = to_uint8(colorize(scaled[other], "viridis")).permute(1, 2, 0).numpy().astype(int)
            assert np.abs(first - colours.repeat(4, axis=0).repeat(4, axis=1)).mean() > 10


def test_feature_maps_are_captured_before_an_inplace_relu():
    torch.manual_seed(0)
    model = TinyCNN()  # stem = conv, BN, ReLU(inplace=True): the ReLU overwrites BN's output in place
    images, _ = make_batch(1)
    seen = feature_maps(model, images, ["stem.1"])["stem.1"]
    model.eval()
    with torch.no_grad():
        expected = model.stem[1](model.stem[0](images))
    assert (seen < 0).any()  # negative values survive: captured before the in-place ReLU
    assert torch.allclose(seen, expected, atol=1e-6)


def test_feature_maps_leave_no_hook_and_restore_the_mode():
    torch.manual_seed(0)
    model = TinyCNN().train()
    hooks = hook_counts(model)
    images, _ = make_batch(1, n=2)
    out = feature_maps(model, images, ["stem.0", model.body[3]])
    assert set(out) == {"stem.0", "body.3"} and out["body.3"].shape == (2, 16, 8, 8)
    assert hook_counts(model) == hooks and model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_feature_maps_of_a_layer_with_a_tuple_output_take_its_feature_map():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.mean(), y  # the 4-D tensor is the second one

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            _, y = self.pair(x)
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net()
    images, _ = make_batch(1, n=2)
    out = feature_maps(net, images, ["pair"])["pair"]
    assert torch.allclose(out, feature_maps(net, images, ["pair.conv"])["pair.conv"])


def test_top_channels_rank_by_spatial_mean():
    acts = torch.zeros(2, 4, 2, 2)
    acts[0, :, 0, 0] = torch.tensor([1.0, 8.0, 4.0, -2.0])  # means 0.25, 2, 1, -0.5
    acts[1] = torch.tensor([0.5, -1.0, 0.0, 3.0]).view(4, 1, 1)
    indices, values = top_channels(acts, 2)
    assert indices.tolist() == [[1, 2], [3, 0]] and torch.allclose(values[0], torch.tensor([2.0, 1.0]))
    assert top_channels(acts, 10)[0].shape == (2, 4)  # k capped at the channel count
    with pytest.raises(ValueError, match=r"activations must be \[N, K, h, w\], got shape \(4, 2, 2\)"):
        top_channels(acts[0], 2)


def test_feature_panel_layout_and_input_left_alone():
    image = torch.rand(3, 20, 20)
    acts = torch.rand(6, 6, 6)
    before = image.clone(), acts.clone()
    panel = feature_panel(image, acts, k=3)
    # input + 3 tiles of 48 px (6 px maps ×8), 2 px apart; a caption band below
    assert panel.shape[0] == 3 and panel.shape[2] == PAD + 4 * (TILE + PAD) and panel.shape[1] > PAD + TILE + PAD
    assert torch.equal(image, before[0]) and torch.equal(acts, before[1])


def test_a_layer_without_a_feature_map_is_named(tmp_path):
    with tiny_logger(tmp_path, kinds=["features"], layers={"features": ["head"]}, every=1) as vis:
        with pytest.raises(ValueError, match=r"layer 'head' outputs \(4, 4\), not a feature map \[N, C, H, W\]"):
            vis.step(0)


def test_large_maps_are_shrunk_by_area_averaging_before_they_are_coloured():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(8)
    acts = torch.rand(3, 96, 96, generator=g)
    acts[1] += 1.0  # channel 1 the most active, then 2, then 0
    acts[2] += 0.5
    panel = to_uint8(feature_panel(torch.rand(3, 96, 96, generator=g), acts, k=2)).permute(1, 2, 0).numpy()
    shown = acts[[1, 2]]
    scaled = (shown - shown.min()) / (shown.max() - shown.min())
    small = F.interpolate(scaled[None], size=(TILE, TILE), mode="area")[0]  # the test's own shrinking
    for rank in range(2):
        left = PAD + (rank + 1) * (TILE + PAD)
        tile = panel[PAD : PAD + TILE, left : left + TILE].astype(int)
        expected = to_uint8(colorize(small[rank], "viridis")).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(tile - expected).max() <= 1, f"tile {rank + 1}"
