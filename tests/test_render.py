"""Rendering helpers: golden values on tiny tensors, inputs never mutated."""

from __future__ import annotations

import pytest
import torch

from cnnvis_tb import colorize, make_grid, overlay_heatmap
from cnnvis_tb.render import caption, denormalize, to_uint8, upscale


def test_colorize_endpoints_and_shape():
    v = torch.tensor([[0.0, 1.0], [0.5, float("nan")]])
    rgb = colorize(v, "rdbu")
    assert rgb.shape == (3, 2, 2)
    assert torch.allclose(rgb[:, 1, 0], torch.tensor([0.969, 0.969, 0.969]), atol=1e-3)  # 0.5 is the white middle
    assert torch.allclose(rgb[:, 1, 1], rgb[:, 0, 0])  # NaN drawn as the lowest colour
    jet = colorize(torch.tensor([[0.0, 1.0]]), "jet")
    assert torch.allclose(jet[:, 0, 0], torch.tensor([0.0, 0.0, 0.5])) and torch.allclose(jet[:, 0, 1], torch.tensor([0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown colormap 'hot'"):
        colorize(v, "hot")


def test_make_grid_layout():
    tiles = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2) / 2
    grid = make_grid(tiles, ncol=2, padding=1, pad_value=9.0)
    assert grid.shape == (1, 7, 7)
    assert grid[0, 1, 1] == 0.0 and grid[0, 1, 4] == 0.5 and grid[0, 4, 1] == 1.0
    assert grid[0, 4, 4] == 9.0 and grid[0, 0, 0] == 9.0  # empty cell and border keep the pad value


def test_overlay_blends_and_does_not_mutate():
    images = torch.full((1, 1, 2, 2), 0.2)
    heat = torch.ones(1, 1, 1)  # resized to 2×2
    before = images.clone()
    out = overlay_heatmap(images, heat, alpha=0.5, cmap="jet")
    assert out.shape == (1, 3, 2, 2) and torch.equal(images, before)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.35, 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"heatmaps must be \[N, h, w\] with N=1"):
        overlay_heatmap(images, torch.ones(2, 2, 2))


def test_denormalize_upscale_uint8_caption():
    x = torch.zeros(1, 3, 1, 1)
    assert torch.allclose(denormalize(x, [0.5] * 3, [0.25] * 3), torch.full((1, 3, 1, 1), 0.5))
    scaled = denormalize(torch.tensor([[[[-1.0, 1.0]]]]).expand(1, 3, 1, 2), None, None)
    assert scaled.min() == 0 and scaled.max() == 1
    assert upscale(torch.ones(1, 1, 3, 5), 7).shape == (1, 1, 9, 15)
    assert to_uint8(torch.tensor([[[0.0, 0.5, 1.0]]])).tolist() == [[[0, 128, 255]]]
    captioned = caption(torch.zeros(3, 10, 60), ["hello"])
    assert captioned.shape[1] > 10 and captioned[:, 10:].min() < 0.5  # text drawn in the band


def test_fit_enlarges_small_and_shrinks_large():
    from cnnvis_tb.render import fit

    assert fit(torch.ones(1, 3, 32, 32), 96, 96).shape[-2:] == (96, 96)  # ×3, nearest
    assert fit(torch.ones(1, 3, 224, 112), 48, 96).shape[-2:] == (96, 48)  # area, aspect kept
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(fit(x, 48, 96), x)
    assert torch.allclose(fit(torch.full((1, 1, 200, 200), 0.3), 10, 50), torch.full((1, 1, 50, 50), 0.3))


def _grid_by_loop(tiles, ncol, padding, pad_value):
    """The layout rule of make_grid's docstring, tile by tile."""
    n, c, h, w = tiles.shape
    nrow = -(-n // ncol)
    grid = torch.full((c, padding + nrow * (h + padding), padding + ncol * (w + padding)), pad_value)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = tiles[i]
    return grid


@pytest.mark.parametrize("n, c, h, w, ncol, padding", [
    (1, 3, 4, 5, 1, 0), (7, 1, 3, 2, 3, 1), (16, 3, 2, 2, 4, 2), (5, 3, 6, 1, 7, 3), (1024, 3, 3, 3, 16, 1),
])
def test_make_grid_matches_the_documented_layout_rule(n, c, h, w, ncol, padding):
    from cnnvis_tb.render import make_grids

    gen = torch.Generator().manual_seed(n)
    tiles = torch.rand(n, c, h, w, generator=gen)
    expected = _grid_by_loop(tiles, min(ncol, n), padding, 0.25)
    assert torch.equal(make_grid(tiles, ncol=ncol, padding=padding, pad_value=0.25), expected)
    batch = torch.stack([tiles, 1 - tiles])
    grids = make_grids(batch, ncol=ncol, padding=padding, pad_value=0.25)
    assert torch.equal(grids[1], _grid_by_loop(1 - tiles, min(ncol, n), padding, 0.25))
    for factor in (2, 3):  # tiles enlarged as they are placed: the layout rule on the enlarged tiles
        big = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
        expected = _grid_by_loop(big, min(ncol, n), padding, 0.25)
        assert torch.equal(make_grid(tiles, ncol=ncol, padding=padding, pad_value=0.25, factor=factor), expected)
        as_bytes = make_grid((tiles * 255).to(torch.uint8), ncol=ncol, padding=padding, pad_value=7, factor=factor)
        assert torch.equal(as_bytes, _grid_by_loop((big * 255).to(torch.uint8), min(ncol, n), padding, 7))
    with pytest.raises(ValueError, match="factor"):
        make_grid(tiles, factor=0)


def test_upscale_repeats_each_pixel_factor_by_factor():
    x = torch.rand(2, 3, 4, 5)
    big = upscale(x, 9)  # factor 3 (4 px -> 12 >= 9)
    assert torch.equal(big, x.repeat_interleave(3, dim=-2).repeat_interleave(3, dim=-1))
    assert upscale(x, 4) is x


def test_caption_band_height_and_repeated_lines():
    image = torch.zeros(3, 10, 40)
    one = caption(image, ["a label that is far too long for forty pixels"])
    assert one.shape == (3, 10 + 14 + 4, 40)
    assert torch.equal(one, caption(image, ["a label that is far too long for forty pixels"]))  # cached line, same pixels
    two = caption(image, ["x", "y"])
    assert two.shape == (3, 10 + 2 * 14 + 4, 40) and two[:, 10:12].min() == 1.0  # white margin above the text
    assert not torch.equal(two[:, 12:26], two[:, 26:40])  # each line its own text


def test_caption_lines_from_the_glyph_atlas_match_pillows_own_drawing():
    import numpy as np
    from PIL import Image, ImageDraw

    from cnnvis_tb.render import _font, _line_ink, _shade

    font = _font(11)
    for text in ["Grad-CAM++", "pred: triangle · 97%", "pred: class 3 · 25%", "top channels: 12, 4, 55, 3", "true: {circle} <b>&amp;"]:
        canvas = Image.new("RGB", (200, 14), (255, 255, 255))
        ImageDraw.Draw(canvas).text((2, 0), text, fill=(20, 20, 20), font=font)
        expected = np.asarray(canvas, dtype=np.float32) / 255
        ours = _shade(_line_ink(text, 200, 11)).numpy()[..., None]  # one caption line's grey levels
        assert np.abs(ours - expected).max() <= 4 / 255, text  # where two glyphs touch, coverage may differ a hair
    assert _line_ink("naïve", 60, 11).shape == (14, 60)  # characters outside the atlas are drawn by Pillow


def test_the_caption_cache_is_bounded_in_lines_and_keeps_one_byte_per_pixel():
    """Lines that never repeat (channel lists, probabilities) once filled a 4,096-line cache of float RGB lines: about
    300 MB for 600 px wide captions, growing over a run. Now at most TEXT_CACHE_LINES lines of uint8 coverage."""
    import gc

    from cnnvis_tb.render import TEXT_CACHE_LINES, _line_ink, caption

    _line_ink.cache_clear()
    image = torch.zeros(3, 4, 600)
    for i in range(TEXT_CACHE_LINES + 500):
        caption(image, [f"top channels: {i}, {i + 1}, {i + 2}"])
    assert _line_ink.cache_info().currsize == TEXT_CACHE_LINES
    gc.collect()
    lines = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape[-2:] == (14, 600)]
    assert all(t.dtype == torch.uint8 and t.dim() == 2 for t in lines)
    assert sum(t.numel() for t in lines) <= TEXT_CACHE_LINES * 14 * 600  # 8.6 MB
    _line_ink.cache_clear()


def _caption_line(text: str, width: int) -> torch.Tensor:
    """The one text line of a caption under a 1-pixel-high image: rows 3..16 (after the image and 2 white rows)."""
    return caption(torch.zeros(3, 1, width), [text])[:, 3:17]


@pytest.mark.parametrize("text", [
    "top channels: " + ", ".join(str(i) for i in range(40)),
    "naïve façade " * 12,  # not in the glyph atlas: drawn by Pillow
], ids=["glyph-atlas", "pillow"])
def test_a_caption_too_long_for_the_image_is_a_prefix_and_an_ellipsis(text):
    width, wide = 120, 2000
    shown = _caption_line(text, width)
    whole = _caption_line(text, wide)
    assert (whole[:, :, width:] < 0.9).any()  # the whole text needs more than the image's width
    assert (shown - whole[:, :, :width]).abs().max() > 0.5  # and what is shown is not the whole text cut at the edge
    # what is shown is exactly a prefix of the text and an ellipsis, drawn whole within the width
    prefixes = [k for k in range(1, len(text) - 1)
                if (candidate := _caption_line(text[:k] + "…", wide))[:, :, width - 1 :].min() == 1.0
                and torch.equal(candidate[:, :, :width], shown)]
    assert len(prefixes) == 1, prefixes
    assert (shown[:, :, 3 * width // 4 :] < 0.9).any()  # and it uses the width: not shortened more than needed


def test_batched_captions_and_strips_equal_the_one_at_a_time_ones():
    from cnnvis_tb.render import caption, captioned_strip, captioned_strips, captions

    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 20, 30, generator=g)
    lines = [["input", "true: circle"], ["Grad-CAM", "pred: class 3 · 25%"], ["naïve", "x"]]  # one line by Pillow
    batched = captions(images, lines)
    for i in range(3):
        assert torch.equal(batched[i], caption(images[i], lines[i]))
    columns = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(3)]
    rows = [[["a", f"{i}"], ["b", "c"], ["d", "e · 9%"]] for i in range(2)]
    strips, records = captioned_strips(columns, rows, ["input", "gradcam/true", "gradcam/pred"])
    for i in range(2):
        strip, panels = captioned_strip([c[i] for c in columns], rows[i], ["input", "gradcam/true", "gradcam/pred"])
        assert torch.equal(strips[i], strip) and records[i] == panels
    with pytest.raises(ValueError, match="as many caption lines"):
        captions(images, [["a"], ["b", "c"], ["d"]])


@pytest.mark.parametrize("cmap", ["viridis", "inferno", "jet", "rdbu"])
def test_colorize_in_bytes_is_within_one_level_of_colorize(cmap):
    from cnnvis_tb.render import colorize_uint8

    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.rand(4, 9, 9, generator=g).flatten(), torch.linspace(0, 1, 2001),
                        torch.tensor([-0.5, 1.5, float("nan"), 0.0, 1.0])]).view(1, -1, 1)
    fast = colorize_uint8(values, cmap)
    reference = to_uint8(colorize(values, cmap))
    assert fast.dtype == torch.uint8 and fast.shape == reference.shape == (1, 3, values.shape[1], 1)
    assert (fast.int() - reference.int()).abs().max() <= 1
    assert torch.equal(fast[..., -3, :], fast[..., -2, :])  # NaN drawn as the lowest colour, as colorize does
    with pytest.raises(ValueError, match="unknown colormap 'hot'"):
        colorize_uint8(values, "hot")


def test_a_caption_in_bytes_is_the_float_caption_in_bytes():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 12, 90, generator=g)
    lines = ["top channels: 3, 1, 7", "ünïcode line drawn by Pillow"]
    fast = caption(to_uint8(image), lines)
    assert fast.dtype == torch.uint8
    assert torch.equal(fast, to_uint8(caption(image, lines)))
    assert torch.equal(to_uint8(fast), fast)  # bytes pass through to_uint8 unchanged
