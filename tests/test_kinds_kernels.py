"""Kernel grids: the documented pixel mapping, grouped / depthwise / 1-channel convolutions, the cap, NaN weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import TinyCNN, image_at, read_events, texts, tiny_logger
from torch import nn

from cnnvis_tb import kernel_grid
from cnnvis_tb.render import colorize


def test_kernel_grid_pixels_for_hand_set_weights(tmp_path):
    """First-layer RGB kernels are colour patches: 0.5 + 0.5 * w / max|W|, tiles upscaled ×8 from 2×2."""
    model = TinyCNN()
    conv = nn.Conv2d(3, 2, 2, bias=False)
    weight = torch.zeros(2, 3, 2, 2)
    weight[0, 0] = 1.0  # kernel 0: pure red, full strength
    weight[1, 2, 0, 0] = -0.5  # kernel 1: blue at -half strength at top left, 0 elsewhere
    conv.weight.data.copy_(weight)
    model.stem[0] = nn.Sequential(conv, nn.ConvTranspose2d(2, 8, 2))  # keep the rest of the model working
    with tiny_logger(tmp_path, model=model, every=1, kinds=["kernels"], layers={"kernels": ["stem.0.0"]}) as vis:
        vis.step(0)
    grid = image_at(read_events(tmp_path), "cnnvis/kernels/stem.0.0/grid")
    # two tiles of 16×16 (2×2 upscaled ×8), 1 px white padding around and between: 1 + 2 * 17 = 35 wide
    assert grid.shape == (18, 35, 3)
    assert (grid[0] == 255).all() and (grid[:, 17] == 255).all()
    tile0, tile1 = grid[1:17, 1:17], grid[1:17, 18:34]
    assert (tile0 == [255, 128, 128]).all()
    assert (tile1[:8, :8] == [128, 128, 64]).all()  # 0.5 - 0.25 = 0.25 -> 64 in blue
    assert (tile1[8:, 8:] == [128, 128, 128]).all()


def test_kernel_grid_deep_grouped_and_capped():
    depthwise = nn.Conv2d(16, 16, 3, groups=16)
    picture = kernel_grid(depthwise)  # [16, 1, 3, 3]: one heat tile per kernel, 4×4 layout
    assert picture.shape == (3, 1 + 4 * 19, 1 + 4 * 19)
    wide = nn.Conv2d(32, 100, 1)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[0, 0] = 1.0
        wide.weight[0, 1] = -1.0
    picture = kernel_grid(wide, max_kernels=64, max_in_channels=16)
    # 64 kernels (cap) of 16 input tiles of 16 px, wrapped near square: 2 blocks of 32 rows, one blank tile apart
    assert picture.shape == (3, 1 + 32 * 17, 1 + (2 * 16 + 1) * 17)
    red, blue, white = picture[:, 1, 1], picture[:, 1, 18], picture[:, 1, 35]
    assert red[0] > 0.35 and red[2] < 0.2 and blue[2] > 0.35 and blue[0] < 0.1 and (white > 0.95).all()
    separator = picture[:, 1:, 1 + 16 * 17: 16 * 17 + 17]
    assert (separator > 0.95).all()  # the blank tile between the blocks
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[32, 0] = 1.0  # kernel 32 opens the second block, in its first row
    second = kernel_grid(wide, max_kernels=64, max_in_channels=16)
    first_tile_of_block_2 = second[:, 1:17, 1 + 17 * 17: 17 * 17 + 17]
    assert first_tile_of_block_2[0].min() > 0.35 and first_tile_of_block_2[2].max() < 0.2  # red
    assert (second[:, 1:17, 1:17] > 0.6).all()  # kernel 0 is now 0: white-ish, not red


def test_one_channel_input_kernels_are_diverging_heat_tiles():
    """A grayscale first layer: one heat tile per kernel, blue < 0 < red, drawn with the rdbu colormap."""
    conv = nn.Conv2d(1, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 2.0  # the largest magnitude: full red
        conv.weight[3, 0, 2, 2] = -1.0  # half strength blue
    picture = kernel_grid(conv)  # 3×3 kernels upscaled ×6 to 18 px, 2×2 layout, 1 px padding
    assert picture.shape == (3, 1 + 2 * 19, 1 + 2 * 19)
    expected = colorize(torch.tensor([[1.0, 0.5, 0.25]]), "rdbu")[:, 0]  # w / max|W| = 1, 0, -0.5
    top_left = picture[:, 1 : 1 + 6, 1 : 1 + 6]  # kernel 0, weight (0, 0)
    zero = picture[:, 1 + 6, 1 + 6]  # kernel 0, weight (1, 1): 0
    last = picture[:, 20 + 12 : 20 + 18, 20 + 12 : 20 + 18]  # kernel 3 (second row, second column), weight (2, 2)
    assert torch.allclose(top_left, expected[:, 0, None, None].expand_as(top_left), atol=1 / 255)
    assert torch.allclose(zero, expected[:, 1], atol=1 / 255)
    assert torch.allclose(last, expected[:, 2, None, None].expand_as(last), atol=1 / 255)
    assert top_left[0].min() > top_left[2].max() and last[2].min() > last[0].max()  # red, then blue


def test_kernel_grid_leaves_the_weight_alone_and_rejects_non_kernels():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    before = conv.weight.detach().clone()
    picture = kernel_grid(conv)
    assert torch.isfinite(picture).all() and picture.min() >= 0 and picture.max() <= 1
    assert torch.equal(conv.weight.isnan(), before.isnan())
    assert torch.equal(conv.weight.nan_to_num(), before.nan_to_num())
    with pytest.raises(ValueError, match=r"kernel weight must be \[out, in, kh, kw\], got \(4, 3\)"):
        kernel_grid(torch.zeros(4, 3))


def test_non_finite_weights_are_drawn_as_zero_and_do_not_set_the_scale():
    weight = torch.zeros(2, 3, 1, 1)
    weight[0, 0] = float("inf")
    weight[1, 0] = 0.5  # the largest finite magnitude: full red
    picture = kernel_grid(weight, min_tile=1)  # 1×1 tiles side by side: 1 + 2 * 2 wide
    assert picture.shape == (3, 3, 5)
    assert torch.allclose(picture[:, 1, 1], torch.tensor([0.5, 0.5, 0.5]), atol=1 / 255)  # inf drawn as 0
    assert torch.allclose(picture[:, 1, 3], torch.tensor([1.0, 0.5, 0.5]), atol=1 / 255)


def test_nan_weights_warn_once_and_the_grid_still_logs(tmp_path):
    model = TinyCNN()
    vis = tiny_logger(tmp_path, model=model, every=1, kinds=["kernels"], strict=False)
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis.step(0)
        vis.step(1)
    vis.close()
    messages = [str(w.message) for w in caught]
    assert sum("1 weights of 'stem.0' are NaN or inf" in m for m in messages) == 1, messages
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [0, 1]
    notes = texts(acc, "cnnvis/summary/stem.0/kernels/text_summary")
    assert notes == [(0, "stem.0: 1 non-finite weights drawn as 0")]  # noted once, not at every step


def test_what_a_capped_grid_leaves_out_is_noted_once(tmp_path):
    with tiny_logger(tmp_path, every=1, kinds=["kernels"], max_kernels=4) as vis:
        assert vis.layers["kernels"] == ["stem.0", "body.0", "body.3"]
        vis.step(0)
        vis.step(1)
    acc = read_events(tmp_path)
    stem = image_at(acc, "cnnvis/kernels/stem.0/grid")  # 4 of 8 RGB 3×3 kernels, 18 px tiles, 2×2
    assert stem.shape == (1 + 2 * 19, 1 + 2 * 19, 3)
    body = image_at(acc, "cnnvis/kernels/body.0/grid")  # 4 of 16 kernels, one row each, 8 input channels each
    assert body.shape == (1 + 4 * 19, 1 + 8 * 19, 3)
    assert texts(acc, "cnnvis/summary/stem.0/kernels/text_summary") == [
        (0, "stem.0: showing the first 4 of 8 kernels")]
    assert texts(acc, "cnnvis/summary/body.0/kernels/text_summary") == [
        (0, "body.0: showing the first 4 of 16 kernels")]


def test_kernels_take_convolutions_only(tmp_path):
    with pytest.raises(ValueError, match=r"'head' is a Linear, not a 2-D convolution"):
        tiny_logger(tmp_path, kinds=["kernels"], layers={"kernels": ["head"]})
    # from a plain list of layers, kernel grids take the convolutions among them
    with tiny_logger(tmp_path, kinds=["kernels", "features"], layers=["body.0", "body.2"]) as vis:
        assert vis.layers == {"kernels": ["body.0"], "features": ["body.0", "body.2"]}
