"""The data contract: every tag cnnvis_tb writes, and how the tab reads them back.

All output goes through the stock ``SummaryWriter`` calls (``add_image``, ``add_histogram``,
``add_text``) under one prefix, so TensorBoard's own Images / Histograms / Text tabs show it too and
other readers (EventAccumulator, tbparse) can use it. The writer side (``cnnvis_tb.logger``) and the
plugin side (``cnnvis_tb.plugin``) both import this module; it imports neither torch nor TensorBoard.

Tag scheme::

    cnnvis/<kind>/<layer>/<view>

* ``kind``  the kind's name (built-in or a user's :class:`cnnvis_tb.Kind`): letters, digits and ``_ . + -``,
  see :func:`check_kind_name`. ``summary`` holds text (the layer table, the kinds table) and ``metrics`` is kept
  for scalars.
* ``layer`` the layer's ``named_modules()`` name (dots kept, never contains ``/``), or ``input``
  for views of the whole model input (saliency) and ``model`` for model-wide text.
* ``view``  what the picture shows: ``probe_003`` (one probe image: Grad-CAM, feature maps, saliency, and DeepDream,
  whose picture is the probe image beside its dream at that layer), ``grid`` (kernel grid),
  ``channels`` (activation maximization), ``weight`` / ``grad`` (histograms), ``layers`` (text).

Scalars go under ``cnnvis/metrics/<kind>/<layer>/<name>`` (:func:`metric_tag`). The CAM metrics' names are
``<metric>/<method>/<target>`` (averaged over the probe), ``<metric>/<method>/<target>/probe_003`` (one probe
image's value, for the metrics worth following per image: the pointing game) and ``agreement/<target>``; see
:func:`cam_metric_name`. A per-image name sorts right after its mean, and :func:`metric_probe_index` tells them apart.

The kinds table (``cnnvis/summary/model/kinds``, a Markdown table written once per run by the logger) tells the
tab each kind's label and order; :func:`kinds_table` writes it and :func:`parse_kinds_table` reads it back.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

__all__ = [
    "PREFIX",
    "RESERVED",
    "KindInfo",
    "check_kind_name",
    "is_kind_name",
    "kinds_table",
    "parse_kinds_table",
    "KINDS_TABLE_TAG",
    "TagParts",
    "image_tag",
    "histogram_tag",
    "text_tag",
    "metric_tag",
    "cam_metric_name",
    "cam_agreement_name",
    "metric_probe_index",
    "parse_tag",
    "probe_view",
    "probe_index",
]

PREFIX = "cnnvis"

#: Tag families that are not kinds: text summaries and metric scalars.
RESERVED = ("summary", "metrics")
_KIND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

_PROBE_VIEW = re.compile(r"^probe_(\d{3,})$")
_SAFE_LAYER = re.compile(r"[/\s]")


def is_kind_name(name: object) -> bool:
    """Whether ``name`` can name a kind: 1-64 letters, digits, ``_ . + -`` (first a letter or digit), not reserved."""
    return isinstance(name, str) and bool(_KIND_NAME.match(name)) and name not in RESERVED


def check_kind_name(name: object) -> str:
    """``name`` if it can name a kind (its tag family ``cnnvis/<name>/...``), else ``ValueError`` saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a kind's name must be a non-empty string, got {name!r}")
    if name in RESERVED:
        raise ValueError(f"kind name {name!r} is reserved for cnnvis_tb's {name} tags; choose another name")
    if "/" in name:
        raise ValueError(f"kind name {name!r} holds '/'; a kind's name is one tag level (cnnvis/<name>/...), "
                         "e.g. 'channel_means'")
    if not _KIND_NAME.match(name):
        raise ValueError(f"kind name {name!r} must be 1-64 letters, digits or '_ . + -', starting with a letter or "
                         "digit, e.g. 'channel_means'")
    return name


class KindInfo(NamedTuple):
    """What the tab knows of a kind: its name (tag family) and the label its button shows."""

    name: str
    label: str


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


def _view_part(view: str) -> str:
    if not isinstance(view, str) or not view:
        raise ValueError("view name must be a non-empty string")
    return view


def _tag(family: str, layer: str, view: str) -> str:
    return f"{PREFIX}/{family}/{_layer_part(layer)}/{_view_part(view)}"


def image_tag(kind: str, layer: str, view: str) -> str:
    """Tag of one image series, e.g. ``image_tag("gradcam", "layer4", probe_view(0))``."""
    return _tag(check_kind_name(kind), layer, view)


def metric_tag(kind: str, layer: str, name: str) -> str:
    """Tag of a scalar a kind logs: ``cnnvis/metrics/<kind>/<layer>/<name>`` (the Scalars tab groups by prefix)."""
    return f"{PREFIX}/metrics/{check_kind_name(kind)}/{_layer_part(layer)}/{_view_part(name)}"


def cam_metric_name(metric: str, method: str, target: str, probe: int | None = None) -> str:
    """Name (under :func:`metric_tag`) of a CAM metric: ``<metric>/<method>/<target>`` for the mean over the probe,
    ``<metric>/<method>/<target>/probe_<i>`` for probe image ``i`` alone, e.g. ``pointing/gradcam/true/probe_003``."""
    for part, what in ((metric, "metric"), (method, "method"), (target, "target")):
        if not isinstance(part, str) or not part or "/" in part:
            raise ValueError(f"a CAM metric's {what} must be a non-empty string without '/', got {part!r}")
    name = f"{metric}/{method}/{target}"
    return name if probe is None else f"{name}/{probe_view(probe)}"


def cam_agreement_name(target: str) -> str:
    """Name (under :func:`metric_tag`) of the agreement between the CAM methods for ``target``:
    ``agreement/<target>``."""
    return f"agreement/{target}"


def metric_probe_index(name: str) -> int | None:
    """The probe image a metric name is about (its last level ``probe_<i>``), ``None`` for a value of the whole
    probe."""
    return probe_index(name.rpartition("/")[2])


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


#: Where the logger writes the kinds table of a run (``add_text`` appends ``/text_summary``).
KINDS_TABLE_TAG = _tag("summary", "model", "kinds")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")


def kinds_table(kinds: list[tuple[str, str, str]]) -> str:
    """The kinds table: a Markdown table, one row ``| name | label | details |`` per kind, in the tab's order."""
    rows = ["| kind | label | details |", "| --- | --- | --- |"]
    rows += [f"| {check_kind_name(name)} | {_cell(label)} | {_cell(details)} |" for name, label, details in kinds]
    return "\n".join(rows)


_UNESCAPED_BAR = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def _split_row(line: str) -> list[str]:
    parts = _UNESCAPED_BAR.sub(lambda m: m.group(1) + "\0", line.strip()).split("\0")
    return [p.strip().replace("\\|", "|").replace("\\\\", "\\") for p in parts[1:-1]]


def parse_kinds_table(text: str) -> list[KindInfo]:
    """The kinds listed in a kinds table, in its order; rows that do not parse are skipped."""
    found: list[KindInfo] = []
    for line in text.splitlines()[2:]:
        cells = _split_row(line)
        if len(cells) >= 2 and is_kind_name(cells[0]) and cells[0] not in {k.name for k in found}:
            found.append(KindInfo(cells[0], cells[1] or cells[0]))
    return found


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
    if not (kind == "summary" or is_kind_name(kind)) or not layer or not view:
        return None
    return TagParts(kind, layer, view)


#: Suffix of the view of a panels record: ``cnnvis/summary/<layer>/<kind>.panels`` (see :func:`panels_tag`).
PANELS_SUFFIX = ".panels"


def panels_tag(kind: str, layer: str) -> str:
    """Tag of the panel records of a kind's pictures of one layer, one text per logging step:
    ``cnnvis/summary/<layer>/<kind>.panels`` (``add_text`` appends ``/text_summary``)."""
    return _tag("summary", layer, check_kind_name(kind) + PANELS_SUFFIX)


def panels_text(views: dict[str, list[dict]]) -> str:
    """The text of a panels record: ``{view: [{"key", "label", "box": [x, y, w, h], "text": [line]}]}`` as JSON in a
    fenced block (the Text tab shows it as code)."""
    return "```json\n" + json.dumps({"views": views}, ensure_ascii=False, separators=(",", ":")) + "\n```"


def parse_panels_text(text: str) -> dict[str, list[dict]]:
    """Inverse of :func:`panels_text`: ``{view: [record]}``; records that do not parse are dropped (``{}`` when
    nothing does). A record keeps ``key`` (str), ``label`` (str, default the key), ``box`` (4 non-negative ints)
    and ``text`` (a list of str)."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        views = json.loads(body).get("views", {})
    except (ValueError, AttributeError):
        return {}
    out: dict[str, list[dict]] = {}
    for view, records in views.items() if isinstance(views, dict) else ():
        good = []
        for r in records if isinstance(records, list) else ():
            box, lines = (r.get("box"), r.get("text", [])) if isinstance(r, dict) else (None, None)
            if (isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, int) and v >= 0 for v in box) and isinstance(lines, list)
                    and all(isinstance(t, str) for t in lines)):
                label = r.get("label")
                good.append({"key": r["key"], "label": label if isinstance(label, str) else r["key"], "box": box,
                             "text": lines})
        if good and isinstance(view, str):
            out[view] = good
    return out


def parse_panels_tag(tag: str) -> tuple[str, str] | None:
    """``(kind, layer)`` of a panels tag (with or without ``/text_summary``), else ``None``."""
    if tag.endswith("/text_summary"):
        tag = tag[: -len("/text_summary")]
    parts = parse_tag(tag)
    if parts is None or parts.kind != "summary" or not parts.view.endswith(PANELS_SUFFIX):
        return None
    kind = parts.view[: -len(PANELS_SUFFIX)]
    return (kind, parts.layer) if is_kind_name(kind) else None
