"""The data contract: every tag cnnvis_tb writes, and how the tab reads them back.

All output goes through the stock ``SummaryWriter`` calls (``add_image``, ``add_histogram``,
``add_text``) under one prefix, so TensorBoard's own Images / Histograms / Text tabs show it too and
other readers (EventAccumulator, tbparse) can use it. The writer side (``cnnvis_tb.logger``) and the
plugin side (``cnnvis_tb.plugin``) both import this module; it imports neither torch nor TensorBoard.

Tag scheme::

    cnnvis/<kind>/<layer>/<view>

* ``kind``  one of :data:`KINDS` (``summary`` holds text such as the layer table).
* ``layer`` the layer's ``named_modules()`` name (dots kept, never contains ``/``), or ``input``
  for views of the whole model input (saliency) and ``model`` for model-wide text.
* ``view``  what the picture shows: ``probe_003`` (one probe image), ``grid`` (kernel grid),
  ``channels`` (activation maximization), ``weight`` / ``grad`` (histograms), ``layers`` (text).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "PREFIX",
    "KINDS",
    "IMAGE_KINDS",
    "TagParts",
    "image_tag",
    "histogram_tag",
    "text_tag",
    "parse_tag",
    "probe_view",
    "probe_index",
]

PREFIX = "cnnvis"

#: Every visual kind, in the order the tab lists them.
KINDS = ("gradcam", "features", "kernels", "actmax", "saliency", "histograms", "summary")
#: Kinds written as images (read by the tab through the stock ``images`` plugin's data).
IMAGE_KINDS = ("gradcam", "features", "kernels", "actmax", "saliency")

_PROBE_VIEW = re.compile(r"^probe_(\d{3,})$")
_SAFE_LAYER = re.compile(r"[/\s]")


class TagParts(NamedTuple):
    """A parsed ``cnnvis/<kind>/<layer>/<view>`` tag."""

    kind: str
    layer: str
    view: str


def _layer_part(layer: str) -> str:
    if not layer:
        raise ValueError("layer name must be a non-empty string")
    # named_modules() names never hold '/', but user-given names for views might; keep one level.
    return _SAFE_LAYER.sub("_", layer)


def _tag(kind: str, layer: str, view: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return f"{PREFIX}/{kind}/{_layer_part(layer)}/{view}"


def image_tag(kind: str, layer: str, view: str) -> str:
    """Tag of one image series, e.g. ``image_tag("gradcam", "layer4", probe_view(0))``."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"{kind!r} is not an image kind; expected one of {IMAGE_KINDS}")
    return _tag(kind, layer, view)


def histogram_tag(parameter: str, view: str = "weight") -> str:
    """Tag of a parameter's histogram; ``view`` is ``weight`` or ``grad``.

    ``parameter`` is a ``named_parameters()`` name such as ``features.0.weight``: the layer part is
    the module name (``features.0``) and the view says which tensor (``weight``/``bias``, plus ``.grad``).
    """
    if view not in ("weight", "grad"):
        raise ValueError(f"histogram view must be 'weight' or 'grad', got {view!r}")
    module, _, tensor_name = parameter.rpartition(".")
    layer = module or "model"
    leaf = tensor_name if view == "weight" else f"{tensor_name}.grad"
    return _tag("histograms", layer, leaf)


def text_tag(layer: str, view: str) -> str:
    """Tag of a text summary, e.g. ``text_tag("model", "layers")`` for the layer table."""
    return _tag("summary", layer, view)


def probe_view(index: int) -> str:
    """View name of probe image ``index`` (zero-padded so tags sort in probe order)."""
    if index < 0:
        raise ValueError(f"probe index must be >= 0, got {index}")
    return f"probe_{index:03d}"


def probe_index(view: str) -> int | None:
    """Inverse of :func:`probe_view`; ``None`` when the view is not about one probe image."""
    m = _PROBE_VIEW.match(view)
    return int(m.group(1)) if m else None


def parse_tag(tag: str) -> TagParts | None:
    """Split a cnnvis tag into its parts; ``None`` for tags that are not ours or are malformed."""
    parts = tag.split("/", 3)
    if len(parts) != 4 or parts[0] != PREFIX:
        return None
    _, kind, layer, view = parts
    if kind not in KINDS or not layer or not view:
        return None
    return TagParts(kind, layer, view)
