"""Rendering: colormaps, grids, heatmap overlays and captions. Tensor in, tensor out.

Every function here takes and returns float tensors with values in ``[0, 1]`` (images ``[N, C, H, W]``
or ``[C, H, W]``, maps ``[N, H, W]``), never mutates its inputs and needs no gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "COLORMAPS",
    "colorize",
    "colorize_uint8",
    "overlay_heatmap",
    "make_grid",
    "make_grids",
    "as_rgb",
    "denormalize",
    "to_uint8",
    "caption",
    "captioned_strip",
    "captioned_strips",
    "captions",
    "grid_boxes",
    "upscale",
    "upscale_factor",
    "fit",
]

# Anchor colours, evenly spaced over [0, 1]; values in between are interpolated linearly.
_ANCHORS: dict[str, list[tuple[float, float, float]]] = {
    "viridis": [
        (0.267, 0.005, 0.329), (0.283, 0.141, 0.458), (0.254, 0.265, 0.530), (0.207, 0.372, 0.553),
        (0.164, 0.471, 0.558), (0.128, 0.567, 0.551), (0.135, 0.659, 0.518), (0.267, 0.749, 0.441),
        (0.478, 0.821, 0.318), (0.741, 0.873, 0.150), (0.993, 0.906, 0.144),
    ],
    "inferno": [
        (0.001, 0.000, 0.014), (0.087, 0.045, 0.225), (0.258, 0.039, 0.406), (0.416, 0.090, 0.433),
        (0.578, 0.148, 0.404), (0.735, 0.216, 0.330), (0.865, 0.317, 0.226), (0.954, 0.469, 0.098),
        (0.987, 0.645, 0.040), (0.964, 0.843, 0.273), (0.988, 0.998, 0.645),
    ],
    "jet": [
        (0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 0.5, 1.0), (0.0, 1.0, 1.0), (0.5, 1.0, 0.5),
        (1.0, 1.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0),
    ],
    # Diverging, symmetric around 0.5 (white): blue for negative weights, red for positive.
    "rdbu": [
        (0.020, 0.188, 0.380), (0.129, 0.400, 0.675), (0.263, 0.576, 0.765), (0.573, 0.773, 0.871),
        (0.820, 0.898, 0.941), (0.969, 0.969, 0.969), (0.992, 0.859, 0.780), (0.957, 0.647, 0.510),
        (0.839, 0.376, 0.302), (0.698, 0.094, 0.169), (0.404, 0.000, 0.122),
    ],
}
COLORMAPS = tuple(_ANCHORS)


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: tensor expected, got {type(x).__name__}")
    return x


@torch.no_grad()
def colorize(values: torch.Tensor, cmap: str = "viridis") -> torch.Tensor:
    """Map values in ``[0, 1]`` (any shape ``[...]``) to RGB colours ``[..., 3, H, W]``-style.

    ``values`` of shape ``[N, H, W]`` gives ``[N, 3, H, W]``; ``[H, W]`` gives ``[3, H, W]``.
    Values outside ``[0, 1]`` are clamped; NaN is drawn as the colormap's lowest colour.
    """
    values = _check_tensor(values, "values")
    if cmap not in _ANCHORS:
        raise ValueError(f"unknown colormap {cmap!r}; expected one of {COLORMAPS}")
    if values.dim() < 2:
        raise ValueError(f"values must be at least [H, W], got shape {tuple(values.shape)}")
    anchors = torch.tensor(_ANCHORS[cmap], dtype=torch.float32, device=values.device)
    v = torch.nan_to_num(values.float(), nan=0.0).clamp(0, 1) * (len(anchors) - 1)
    lo = v.floor().long().clamp(max=len(anchors) - 2)
    frac = (v - lo).unsqueeze(-1)
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac  # [..., H, W, 3]
    return rgb.movedim(-1, -3).contiguous()


#: Entries of the colour tables of :func:`colorize_uint8`: values are quantized to 1/1023, so a colour differs from
#: :func:`colorize`'s (rounded to bytes) by at most one level on any colormap here.
LUT_SIZE = 1024


@functools.lru_cache(maxsize=len(_ANCHORS))
def _lut(cmap: str) -> torch.Tensor:
    """``[LUT_SIZE, 3]`` uint8: :func:`colorize` of ``LUT_SIZE`` evenly spaced values, rounded to bytes."""
    return to_uint8(colorize(torch.linspace(0, 1, LUT_SIZE)[None], cmap))[:, 0].T.contiguous()


@torch.no_grad()
def colorize_uint8(values: torch.Tensor, cmap: str = "viridis") -> torch.Tensor:
    """:func:`colorize` straight to bytes: values in ``[0, 1]`` → ``uint8`` colours ``[..., 3, H, W]`` on the CPU, by
    one lookup in a table of :data:`LUT_SIZE` colours (within one level of ``to_uint8(colorize(values, cmap))``;
    clamped, NaN drawn as the lowest colour, as there). Four times fewer bytes to enlarge and lay out than floats."""
    values = _check_tensor(values, "values")
    if cmap not in _ANCHORS:
        raise ValueError(f"unknown colormap {cmap!r}; expected one of {COLORMAPS}")
    if values.dim() < 2:
        raise ValueError(f"values must be at least [H, W], got shape {tuple(values.shape)}")
    index = torch.nan_to_num(values.detach().float().cpu(), nan=0.0).clamp_(0, 1).mul_(LUT_SIZE - 1).round_().long()
    return _lut(cmap)[index].movedim(-1, -3).contiguous()


@torch.no_grad()
def denormalize(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` on ``[N, C, H, W]`` images and clamp to ``[0, 1]``.

    With ``mean``/``std`` of None, images are assumed to be in ``[0, 1]`` already; if they are not
    (a probe normalized without telling us), each image is min-max scaled so it is still visible.
    """
    images = _check_tensor(images, "images").detach().float()
    if mean is None and std is None:
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        outside = (lo < 0) | (hi > 1)
        scaled = (images - lo) / (hi - lo).clamp_min(1e-8)
        return torch.where(outside, scaled, images)
    c = images.shape[1]
    m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32, device=images.device)
    s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=torch.float32, device=images.device)
    return (images * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)).clamp(0, 1)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1 or 3, H, W]`` → ``[N, 3, H, W]``: a grey image repeated over three channels (a view, no copy)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def overlay_heatmap(
    images: torch.Tensor, heatmaps: torch.Tensor, *, alpha: float = 0.5, cmap: str = "jet"
) -> torch.Tensor:
    """Blend heatmaps over images: ``(1 - alpha) * image + alpha * cmap(heatmap)``.

    Args:
        images: ``[N, C, H, W]`` with ``C`` in ``{1, 3}``, values in ``[0, 1]`` (de-normalized).
        heatmaps: ``[N, h, w]`` in ``[0, 1]``; resized bilinearly to ``H x W`` when the sizes differ.
        alpha: weight of the colour map, in ``[0, 1]``.
        cmap: one of :data:`COLORMAPS`.

    Returns:
        ``[N, 3, H, W]`` float in ``[0, 1]``.
    """
    images = _check_tensor(images, "images")
    heatmaps = _check_tensor(heatmaps, "heatmaps")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if heatmaps.dim() != 3 or heatmaps.shape[0] != images.shape[0]:
        raise ValueError(
            f"heatmaps must be [N, h, w] with N={images.shape[0]} like images, got shape {tuple(heatmaps.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = images.shape[-2:]
    heat = heatmaps.detach().float().to(images.device)
    if heat.shape[-2:] != (h, w):
        heat = F.interpolate(heat[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    rgb = as_rgb(images.detach().float())
    return ((1 - alpha) * rgb.clamp(0, 1) + alpha * colorize(heat, cmap)).clamp(0, 1)


@torch.no_grad()
def make_grid(tiles: torch.Tensor, ncol: int | None = None, padding: int = 1, pad_value: float = 1.0,
              factor: int = 1) -> torch.Tensor:
    """Lay out ``[N, C, h, w]`` tiles row-major in a ``[C, H, W]`` grid with ``padding`` pixels between tiles.

    ``ncol`` defaults to ``ceil(sqrt(N))``. The border around the grid is ``padding`` wide too, so each
    tile ``i`` starts at row ``padding + (i // ncol) * (h + padding)`` and column
    ``padding + (i % ncol) * (w + padding)``. Tiles of any dtype (uint8 too: then ``pad_value`` is in 0..255).
    ``factor`` > 1 enlarges each tile by nearest neighbour as it is placed (``h`` and ``w`` above are then the
    enlarged sizes): the same grid as ``make_grid(upscale(...))`` in one copy instead of two.
    """
    tiles = _check_tensor(tiles, "tiles")
    if tiles.dim() != 4 or tiles.shape[0] == 0:
        raise ValueError(f"tiles must be a non-empty [N, C, h, w] tensor, got shape {tuple(tiles.shape)}")
    return make_grids(tiles[None], ncol, padding, pad_value, factor)[0]


@torch.no_grad()
def make_grids(tiles: torch.Tensor, ncol: int | None = None, padding: int = 1, pad_value: float = 1.0,
               factor: int = 1) -> torch.Tensor:
    """:func:`make_grid` for a batch: ``[B, N, C, h, w]`` tiles → ``[B, C, H, W]``, B grids laid out alike.

    At most two tensor copies whatever the number of tiles (no Python loop over tiles).
    """
    tiles = _check_tensor(tiles, "tiles")
    if tiles.dim() != 5 or tiles.shape[1] == 0:
        raise ValueError(f"tiles must be a non-empty [B, N, C, h, w] tensor, got shape {tuple(tiles.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    b, n, c, h, w = tiles.shape
    ncol = max(1, min(n, ncol if ncol else int(-(-(n**0.5) // 1))))
    nrow = -(-n // ncol)
    ch, cw = h * factor + padding, w * factor + padding
    grid = tiles.new_full((b, c, nrow * ch + padding, ncol * cw + padding), pad_value)
    # Tiles enlarged along their rows first (a small copy: contiguous runs of w * factor pixels to place, not runs of
    # factor, which copy several times slower); each row is then repeated factor times as it is placed.
    if factor > 1:
        tiles = tiles.repeat_interleave(factor, dim=-1)
    wide = w * factor
    # The grid without its bottom and right border, seen as [B, C, row, cell row, column, cell column]: each
    # cell holds its padding above and to the left, then its tile, seen as [h, factor, w * factor] (each source
    # row's block). One strided, broadcasting copy per block of full rows.
    cells = grid[:, :, : nrow * ch, : ncol * cw].view(b, c, nrow, ch, ncol, cw)[:, :, :, padding:, :, padding:]
    cells = cells.unflatten(3, (h, factor))  # [B, C, row, h, f, column, w * f]
    full = n // ncol
    if full:
        src = tiles[:, : full * ncol].reshape(b, full, ncol, c, h, wide).permute(0, 3, 1, 4, 2, 5)
        cells[:, :, :full] = src[:, :, :, :, None]
    if n > full * ncol:  # the last, partly filled row
        rest = n - full * ncol
        cells[:, :, full, :, :, :rest] = tiles[:, full * ncol :].permute(0, 2, 3, 1, 4)[:, :, :, None]
    return grid


def upscale_factor(h: int, w: int, min_size: int) -> int:
    """The smallest integer factor that makes the shorter of ``h``, ``w`` at least ``min_size`` (1 if it is)."""
    return max(1, -(-min_size // max(1, min(h, w))))


@torch.no_grad()
def upscale(images: torch.Tensor, min_size: int, mode: str = "nearest") -> torch.Tensor:
    """Enlarge ``[N, C, h, w]`` by the smallest integer factor that makes the shorter side ``>= min_size``."""
    h, w = images.shape[-2:]
    factor = upscale_factor(h, w, min_size)
    if factor == 1:
        return images
    if mode == "nearest":  # every pixel repeated factor x factor times, as one broadcast copy
        lead = images.shape[:-2]
        big = images[..., :, None, :, None].expand(*lead, h, factor, w, factor)
        return big.reshape(*lead, h * factor, w * factor)
    return F.interpolate(images, scale_factor=factor, mode=mode, align_corners=False).clamp(0, 1)


@torch.no_grad()
def fit(images: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """Size ``[N, C, h, w]`` pictures for display: small ones enlarged by an integer factor (nearest, so pixels
    stay sharp) until the shorter side is ``>= min_size``; large ones shrunk (area averaging) so the longer
    side is ``<= max_size``. Keeps logged images small for big inputs (224 px) and legible for tiny ones."""
    h, w = images.shape[-2:]
    if min(h, w) < min_size:
        return upscale(images, min_size)
    if max(h, w) > max_size:
        scale = max_size / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return F.interpolate(images, size=size, mode="area")
    return images


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Float in ``[0, 1]`` (any shape, e.g. ``[C, H, W]``) → ``uint8`` on the CPU (what an image summary stores);
    a picture already in bytes is returned as it is (on the CPU)."""
    if image.dtype == torch.uint8:
        return image.detach().cpu()
    scaled = image.detach().float() * 255  # a new tensor: the in-place steps below leave ``image`` alone
    return scaled.nan_to_num_(0.0).clamp_(0, 255).round_().to(torch.uint8).cpu()


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


_TEXT_INK = 20 / 255  # caption text colour (dark grey), on white


class _GlyphAtlas:
    """Printable ASCII, the ellipsis and the middle dot, each rendered once by Pillow; lines are then composed by
    placing glyphs side by side (no kerning), which costs microseconds where a Pillow ``draw.text`` call costs about
    a millisecond. Lines with other characters are drawn by Pillow."""

    CHARS = "".join(chr(i) for i in range(32, 127)) + "…·"
    PAD = 4  # pixels on each side of a glyph's cell, for ink beyond its advance (italic-like overhangs)

    def __init__(self, font_size: int) -> None:
        import numpy as np
        from PIL import Image, ImageDraw

        font = _font(font_size)
        self.height = font_size + 3
        self.advance: dict[str, float] = {}
        self.ink: dict[str, np.ndarray] = {}  # char -> [height, cell] coverage in [0, 1]
        for ch in self.CHARS:
            advance = font.getlength(ch)
            cell = Image.new("L", (int(advance) + 2 * self.PAD + 1, self.height), 0)
            ImageDraw.Draw(cell).text((self.PAD, 0), ch, fill=255, font=font)
            self.advance[ch] = advance
            self.ink[ch] = np.asarray(cell, dtype=np.float32) / 255.0

    def covers(self, text: str) -> bool:
        return all(ch in self.advance for ch in text)

    def length(self, text: str) -> float:
        return sum(self.advance[ch] for ch in text)

    def draw(self, text: str, width: int, x: float = 2.0):
        """Coverage ``[height, width]`` of ``text`` starting at pixel ``x`` (ink beyond ``width`` is cut)."""
        import numpy as np

        coverage = np.zeros((self.height, width + 2 * self.PAD + 64), dtype=np.float32)
        for ch in text:
            left = int(round(x))
            if left >= width:
                break
            ink = self.ink[ch]
            region = coverage[:, left : left + ink.shape[1]]
            np.maximum(region, ink[:, : region.shape[1]], out=region)
            x += self.advance[ch]
        return coverage[:, self.PAD : self.PAD + width]


@functools.lru_cache(maxsize=4)
def _atlas(font_size: int) -> _GlyphAtlas:
    return _GlyphAtlas(font_size)


#: Caption lines kept rendered (labels repeat every logging step; most other lines, such as channel lists, do
#: not): each is its coverage, ``(font_size + 3) · width`` bytes, so at most about 10 MB for 600 px wide lines.
TEXT_CACHE_LINES = 1024


@functools.lru_cache(maxsize=TEXT_CACHE_LINES)
def _line_ink(text: str, width: int, font_size: int) -> torch.Tensor:
    """The ink of one caption line: ``[font_size + 3, width]`` uint8 coverage (255 = full ink). Text too long for
    ``width`` is shortened with an ellipsis so it stays readable."""
    import numpy as np

    atlas = _atlas(font_size)
    if atlas.covers(text):
        while len(text) > 1 and atlas.length(text) > width - 4:
            text = text[:-2] + "…"
        # The atlas's coverage values are k / 255 (Pillow's 8-bit glyphs, combined by maximum): exact in uint8.
        return torch.from_numpy(np.rint(atlas.draw(text, width) * 255).astype(np.uint8))
    from PIL import Image, ImageDraw

    font = _font(font_size)
    canvas = Image.new("L", (width, font_size + 3), 0)
    draw = ImageDraw.Draw(canvas)
    while len(text) > 1 and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…"
    draw.text((2, 0), text, fill=255, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy())


def _shade(ink: torch.Tensor) -> torch.Tensor:
    """uint8 ink coverage (:func:`_line_ink`, any shape) → float grey levels: dark text on white."""
    return 1 - ink.float() / 255 * (1 - _TEXT_INK)


def _shade_uint8(ink: torch.Tensor) -> torch.Tensor:
    """:func:`_shade` in bytes (the same grey levels, rounded)."""
    return (255 - ink.float() * (1 - _TEXT_INK)).round_().to(torch.uint8)


@torch.no_grad()
def caption(image: torch.Tensor, lines: Sequence[str], *, font_size: int = 11) -> torch.Tensor:
    """Return ``[3, H + band, W]``: ``image`` (``[3, H, W]`` in ``[0, 1]``) above a white band with text lines.

    The band is ``len(lines) * (font_size + 3) + 4`` pixels high: 2 white rows, the lines, 2 white rows. A ``uint8``
    image (0..255) gets its band in bytes too (the same grey levels, rounded).
    """
    image = _check_tensor(image, "image")
    if image.dim() != 3:
        raise ValueError(f"caption needs a [3, H, W] image, got shape {tuple(image.shape)}")
    return captions(image[None], [list(lines)], font_size=font_size)[0]


@torch.no_grad()
def captions(images: torch.Tensor, lines: Sequence[Sequence[str]], *, font_size: int = 11) -> torch.Tensor:
    """:func:`caption` for a batch: ``[N, 3, H, W]`` images and each one's lines (the same number for every image)
    → ``[N, 3, H + band, W]``, the text bands of all images composed at once (one tensor op for the ink, one copy)."""
    images = _check_tensor(images, "images")
    if images.dim() != 4 or len(lines) != images.shape[0]:
        raise ValueError(f"captions needs [N, 3, H, W] images and N lists of lines, got {tuple(images.shape)} and "
                         f"{len(lines)}")
    count = {len(text) for text in lines}
    if len(count) > 1:
        raise ValueError(f"every image needs as many caption lines, got {sorted(count)}")
    if not lines or not count.pop():
        return images
    n, _, _, width = images.shape
    ink = torch.stack([torch.cat([_line_ink(str(t), width, font_size) for t in text]) for text in lines])
    if images.dtype == torch.uint8:  # bytes in, bytes out: the same grey levels, rounded
        band = _shade_uint8(ink).to(images.device)[:, None].expand(n, 3, -1, -1)
        margin = images.new_full((n, 3, 2, width), 255)
        return torch.cat([images, margin, band, margin], dim=2)
    band = _shade(ink.to(images.device))[:, None].expand(n, 3, -1, -1)
    margin = images.new_ones((n, 3, 2, width), dtype=torch.float32)
    return torch.cat([images.float(), margin, band, margin], dim=2)


def captioned_strips(
    columns: Sequence[torch.Tensor],
    lines: Sequence[Sequence[Sequence[str]]],
    keys: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    padding: int = 2,
) -> tuple[torch.Tensor, list[list[dict]]]:
    """:func:`captioned_strip` for a batch of N strips laid out alike: ``columns`` are the K panels' pictures
    ``[N, 3, h, w]`` each, ``lines[i][k]`` the caption lines of panel ``k`` of strip ``i``. Returns ``[N, 3, H, W]``
    and each strip's panel records. Captions and layout are composed for all N·K panels at once."""
    if not columns or len(columns) != len(keys) or any(len(row) != len(columns) for row in lines):
        raise ValueError(f"captioned_strips needs K columns, K keys and K caption lists per strip (got "
                         f"{len(columns)}, {len(keys)}, {sorted({len(row) for row in lines})})")
    panels = torch.stack([c.float() for c in columns], dim=1)  # [N, K, 3, h, w]
    n, k, _, h, w = panels.shape
    if len(lines) != n:
        raise ValueError(f"captioned_strips needs one caption row per strip: {len(lines)} rows for {n} strips")
    captioned = captions(panels.flatten(0, 1), [text for row in lines for text in row])
    strips = make_grids(captioned.view(n, k, *captioned.shape[1:]), ncol=k, padding=padding)
    labels = list(keys) if labels is None else list(labels)
    records = [[{"key": key, "label": label, "box": [padding + j * (w + padding), padding, w, h],
                 "text": [str(t) for t in text]}
                for j, (key, label, text) in enumerate(zip(keys, labels, row, strict=True))] for row in lines]
    return strips, records


def captioned_strip(
    images: Sequence[torch.Tensor],
    lines: Sequence[Sequence[str]],
    keys: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    padding: int = 2,
) -> tuple[torch.Tensor, list[dict]]:
    """A strip of captioned panels side by side, and where each panel's picture lies in it.

    Args:
        images: ``[3, h, w]`` panels in ``[0, 1]``, all the same size.
        lines: each panel's caption lines, burnt in below it (the same number of lines for every panel).
        keys: each panel's name, the same at every logging step (``"input"``, ``"gradcam/true"``).
        labels: what the tab calls each panel in its list (default: the key), e.g. ``"Grad-CAM · true"``.

    Returns:
        The ``[3, H, W]`` strip (:func:`make_grid` of the captioned panels, ``padding`` apart) and one record per
        panel, ``{"key", "label", "box": [x, y, w, h], "text": [lines]}``: ``box`` is the picture without its
        caption band, in the strip's pixels, so the tab can show one panel alone with its caption as text.
    """
    if not (len(images) == len(lines) == len(keys)) or not images:
        raise ValueError(f"captioned_strip needs as many images, caption line lists and keys (got {len(images)}, "
                         f"{len(lines)}, {len(keys)}), at least one")
    h, w = images[0].shape[-2:]
    strip = make_grid(captions(torch.stack([image.float() for image in images]), lines), ncol=len(images),
                      padding=padding)
    labels = list(keys) if labels is None else list(labels)
    records = [{"key": key, "label": label, "box": [padding + i * (w + padding), padding, w, h],
                "text": [str(t) for t in text]}
               for i, (key, label, text) in enumerate(zip(keys, labels, lines, strict=True))]
    return strip, records


def grid_boxes(n: int, ncol: int, tile: tuple[int, int], padding: int = 1) -> list[list[int]]:
    """``[x, y, w, h]`` of each of ``n`` tiles of size ``tile = (h, w)`` laid out by :func:`make_grid`."""
    h, w = tile
    return [[padding + (i % ncol) * (w + padding), padding + (i // ncol) * (h + padding), w, h] for i in range(n)]
