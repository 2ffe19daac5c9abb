"""Pictures you can take away: one self-contained HTML page, or an animated GIF, from a log dir, without a server.

    python -m cnnvis_tb export runs/ --kind gradcam --layer layer4 --image 0 --out report.html
    python -m cnnvis_tb export runs/ --kind kernels --layer conv1 --view grid --gif kernels.gif --run baseline

The event files are read with TensorBoard's own loader (``EventAccumulator``) keeping every step (no sampling).

* :func:`write_report` writes the runs × steps grid of one image series (``cnnvis/<kind>/<layer>/<view>``) as one
  HTML page: every picture inlined as a ``data:`` URI (PNG), captions as text when the kind writes panel records
  (:func:`cnnvis_tb.tags.panels_tag`), and the trends of the kind's metrics for that layer as inline SVG charts.
  The page holds no script and loads nothing (its Content-Security-Policy allows only ``data:`` images and its own
  style), and every run name, tag and caption is HTML-escaped.
* :func:`write_gif` writes an animated filmstrip of one run: one frame per logged step, the step number on a white
  band above each frame, frames padded to one size, looping forever.

Both can show one panel of a picture alone (``panel="gradcam/true"``): it is cut out of each step's picture with
the box of that step's panel record. Bad input (a kind, layer, image, run or panel the log dir does not hold, or a
log dir without cnnvis data) raises :class:`ExportError` naming the available choices; the command line turns it
into exit status 2. Progress goes to the ``cnnvis_tb.export`` logger at INFO.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnnvis_tb import tags

__all__ = ["ExportError", "Series", "Selection", "select", "report_html", "write_report", "gif_frames", "write_gif"]

log = logging.getLogger(__name__)

#: Metric series of a kind and layer shown all when there are at most this many; else only one method and target.
FEW_SERIES = 8
#: Line colours of the runs in the charts (cycled).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
_SIZE_GUIDANCE = {"images": 0, "scalars": 0, "tensors": 0, "histograms": 1, "compressedHistograms": 1, "audio": 1}


class ExportError(ValueError):
    """Input the log dir cannot answer (unknown kind, layer, image, run or panel; no cnnvis data): the message says
    what is available. The command line prints it and exits with status 2."""


@dataclass
class Series:
    """One metric of the chosen kind and layer: its name (under :func:`cnnvis_tb.tags.metric_tag`) and the
    ``(step, value)`` points of each run that logged it."""

    name: str
    runs: dict[str, list[tuple[int, float]]]


@dataclass
class Selection:
    """What an export shows: the image series ``tag`` of every run holding it, at every logged step."""

    logdir: str
    kind: str
    layer: str
    view: str
    tag: str
    panel: str | None
    runs: list[str]
    steps: list[int]
    #: run -> step -> PNG bytes (cut to the panel when one was chosen).
    images: dict[str, dict[int, bytes]]
    #: run -> step -> caption lines (from the panel records; absent when the kind writes none).
    captions: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    metrics: list[Series] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of pictures."""
        return sum(len(by_step) for by_step in self.images.values())


# ---------------------------------------------------------------------- reading
def _natural_key(text: str):
    from cnnvis_tb.plugin.index import natural_key

    return natural_key(text)


def _listing(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "(none)"


def _run_listing(runs) -> str:
    return ", ".join(repr(r) for r in runs) if runs else "(none)"


def _run_dirs(logdir: str) -> dict[str, str]:
    """Run name (the folder relative to ``logdir``, ``.`` for the log dir itself, as TensorBoard names it) -> folder
    of every folder holding event files, found by TensorBoard's own walker."""
    from tensorboard.backend.event_processing import io_wrapper

    found = {}
    for folder in io_wrapper.GetLogdirSubdirectories(logdir):
        run = os.path.relpath(folder, logdir)
        found[run.replace(os.sep, "/")] = folder
    return found


def _load(logdir: str) -> dict:
    """``run -> EventAccumulator`` of every run, every step kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise ExportError(f"no such log dir: {logdir}")
    folders = _run_dirs(logdir)
    if not folders:
        raise ExportError(f"the log dir {logdir} holds no event files (nothing was logged there, or it is the "
                          "wrong folder: give the folder that holds the run folders)")
    accumulators = {}
    for i, run in enumerate(sorted(folders, key=_natural_key), 1):
        log.info("reading run %r (%d/%d)", run, i, len(folders))
        acc = EventAccumulator(folders[run], size_guidance=_SIZE_GUIDANCE)
        acc.Reload()
        accumulators[run] = acc
    return accumulators


def _image_tags(accumulators: dict) -> dict[str, dict[str, dict[str, list[str]]]]:
    """kind -> layer -> view -> [run] of every cnnvis image tag."""
    tree: dict[str, dict[str, dict[str, list[str]]]] = {}
    for run, acc in accumulators.items():
        for tag in acc.Tags().get("images", []):
            parts = tags.parse_tag(tag)
            if parts is None or not tags.is_kind_name(parts.kind) or parts.kind == "histograms":
                continue
            tree.setdefault(parts.kind, {}).setdefault(parts.layer, {}).setdefault(parts.view, []).append(run)
    return tree


def _view_key(view: str):
    probe = tags.probe_index(view)
    return (probe is None, probe or 0, _natural_key(view))


def _views_listing(views) -> str:
    views = sorted(views, key=_view_key)
    probes = [str(tags.probe_index(v)) for v in views if tags.probe_index(v) is not None]
    others = [v for v in views if tags.probe_index(v) is None]
    parts = []
    if probes:
        parts.append(f"--image {', '.join(probes)}")
    if others:
        parts.append(f"--view {', '.join(others)}")
    return " or ".join(parts) or "(none)"


def _choose_view(kind: str, layer: str, views, image: int | None, view: str | None) -> str:
    if image is not None and view is not None:
        raise ExportError("give --image or --view, not both")
    if image is not None:
        if image < 0:
            raise ExportError(f"--image takes a probe index >= 0, got {image}")
        view = tags.probe_view(image)
        if view not in views:
            raise ExportError(f"{kind}/{layer} has no probe image {image} (view {view}); available: "
                              f"{_views_listing(views)}")
        return view
    if view is not None:
        if view not in views:
            raise ExportError(f"{kind}/{layer} has no view {view!r}; available: {_views_listing(views)}")
        return view
    if len(views) == 1:
        return next(iter(views))
    raise ExportError(f"{kind}/{layer} holds several views; choose one: {_views_listing(views)}")


def _texts(acc, tag: str) -> dict[int, str]:
    """step -> text of a text summary (``add_text``'s ``/text_summary`` or the bare tag), the last one of a step."""
    from tensorboard.util import tensor_util

    from cnnvis_tb.plugin.texts import text_of

    held = set(acc.Tags().get("tensors", []))
    out: dict[int, str] = {}
    for name in (tag, tag + "/text_summary"):
        if name in held:
            for event in acc.Tensors(name):
                out[event.step] = text_of(tensor_util.make_ndarray(event.tensor_proto))
    return out


def _caption(records: list[dict], panel: str | None) -> list[str]:
    """Caption lines: the chosen panel's text, or ``label: text`` of every panel of the strip."""
    if panel is not None:
        record = next(r for r in records if r["key"] == panel)
        return list(record["text"])
    lines = []
    for r in records:
        # A panel's first text line is often its title, which the label already says ("Grad-CAM" of "Grad-CAM · true").
        said = {part.strip() for part in r["label"].split(" · ")}
        text = [line for line in r["text"] if line.strip() not in said]
        lines.append(f"{r['label']}: {' · '.join(text)}" if text else r["label"])
    return lines


def _crop(png: bytes, box: Sequence[int]) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        x, y, w, h = box
        x0, y0 = min(x, image.width), min(y, image.height)
        x1, y1 = min(x + w, image.width), min(y + h, image.height)
        if x1 <= x0 or y1 <= y0:
            raise ExportError(f"panel box {list(box)} lies outside the {image.width}×{image.height} picture")
        out = io.BytesIO()
        image.crop((x0, y0, x1, y1)).save(out, format="PNG")
    return out.getvalue()


def _metrics(accumulators: dict, runs: list[str], kind: str, layer: str, view: str,
             panel: str | None = None) -> list[Series]:
    """The metric series of ``kind`` at ``layer`` to chart: all when there are few, else those of the target
    ``true`` (else ``pred``; or none) and the first method logged (or none); per-image series only for the chosen
    probe image.
    A panel named ``<method>/<target>`` (``gradcam++/pred``) picks that method and target when metrics have them."""
    from cnnvis_tb.plugin.metrics import METRIC_ORDER, metric_parts, metric_variant

    names: list[str] = []  # first-logged order
    for run in runs:
        for tag in accumulators[run].Tags().get("scalars", []):
            parts = metric_parts(tag)
            if parts and parts[0] == kind and parts[1] == layer and parts[2] not in names:
                names.append(parts[2])
    variants = {name: metric_variant(name)[1] for name in names}
    names = [n for n in names if variants[n].get("image", view) == view]
    methods = [v["method"] for n in names if "method" in (v := variants[n])]
    targets = {v["target"] for v in variants.values() if "target" in v}
    method, _, target = (panel or "").rpartition("/")
    if method in methods and target in targets:
        names = [n for n in names if variants[n].get("target", target) == target
                 and variants[n].get("method", method) == method]
    elif len(names) > FEW_SERIES:
        first = methods[0] if methods else None
        # The true class's, or (a probe without labels logs the predicted class only) the predicted class's.
        want = "true" if "true" in targets or not targets else "pred" if "pred" in targets else sorted(targets)[0]
        names = [n for n in names if variants[n].get("target", want) == want
                 and variants[n].get("method", first) == first]

    def order(name: str):
        metric = metric_variant(name)[0]
        rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
        return (rank, _natural_key(metric), _natural_key(name))

    series = []
    for name in sorted(names, key=order):
        tag = tags.metric_tag(kind, layer, name)
        by_run = {}
        for run in runs:
            acc = accumulators[run]
            if tag in acc.Tags().get("scalars", []):
                points = sorted({e.step: float(e.value) for e in acc.Scalars(tag)}.items())
                if points:
                    by_run[run] = points
        if by_run:
            series.append(Series(name, by_run))
    return series


def select(logdir: str | os.PathLike, kind: str | None, layer: str | None, *, image: int | None = None,
           view: str | None = None, panel: str | None = None, run: str | None = None,
           metrics: bool = True) -> Selection:
    """Read ``logdir`` and pick the image series ``cnnvis/<kind>/<layer>/<view>`` (``view`` = ``probe_<image>``
    when ``image`` is given) of every run holding it (or of ``run`` alone), at every step, with its captions and
    (``metrics=True``) the metric series of that kind and layer. Raises :class:`ExportError` for input the log dir
    cannot answer, naming what it holds."""
    logdir = str(logdir)
    accumulators = _load(logdir)
    tree = _image_tags(accumulators)
    if not tree:
        raise ExportError(f"the log dir {logdir} holds no cnnvis pictures (runs: {_run_listing(accumulators)}); "
                          "was it written by cnnvis_tb.VisLogger?")
    kinds = sorted(tree, key=_natural_key)
    if kind is None:
        raise ExportError(f"choose a kind with --kind; available kinds: {_listing(kinds)}")
    if kind not in tree:
        raise ExportError(f"the log dir holds no kind {kind!r}; available kinds: {_listing(kinds)}")
    layers = sorted(tree[kind], key=_natural_key)
    if layer is None:
        raise ExportError(f"choose a layer of {kind} with --layer; available layers: {_listing(layers)}")
    if layer not in tree[kind]:
        raise ExportError(f"kind {kind!r} has no layer {layer!r}; available layers: {_listing(layers)}")
    view = _choose_view(kind, layer, tree[kind][layer], image, view)
    tag = tags.image_tag(kind, layer, view)
    runs = sorted(tree[kind][layer][view], key=_natural_key)
    if run is not None:
        if run not in runs:
            raise ExportError(f"no run {run!r} holds {tag}; available runs: {_run_listing(runs)}")
        runs = [run]

    records_tag = tags.panels_tag(kind, layer)
    images: dict[str, dict[int, bytes]] = {}
    captions: dict[str, dict[int, list[str]]] = {}
    panel_keys: list[str] = []
    for name in runs:
        acc = accumulators[name]
        by_step = {e.step: e.encoded_image_string for e in acc.Images(tag)}  # a rewritten step: its last picture
        records = {step: tags.parse_panels_text(text).get(view) for step, text in _texts(acc, records_tag).items()}
        records = {step: r for step, r in records.items() if r}
        for r in records.values():
            panel_keys += [p["key"] for p in r if p["key"] not in panel_keys]
        if panel is not None:
            cut = {}
            for step, png in by_step.items():
                box = next((p["box"] for p in records.get(step, []) if p["key"] == panel), None)
                if box is not None:
                    cut[step] = _crop(png, box)
            if cut.keys() != by_step.keys():
                missing = sorted(by_step.keys() - cut.keys())
                if not cut:
                    continue  # checked below, once every run is read
                log.warning("run %r: no panel %r recorded at steps %s; those steps are left out", name, panel,
                            missing)
            by_step = cut
        images[name] = dict(sorted(by_step.items()))
        captions[name] = {step: _caption(records[step], panel) for step in by_step if step in records
                          and (panel is None or any(p["key"] == panel for p in records[step]))}
    if panel is not None:
        if not panel_keys:
            raise ExportError(f"{kind}/{layer} writes no panel records, so no panel can be cut out; leave out --panel")
        if panel not in panel_keys:
            raise ExportError(f"{tag} has no panel {panel!r}; available panels: {_listing(panel_keys)}")
        runs = [r for r in runs if r in images]
    steps = sorted({step for by_step in images.values() for step in by_step})
    log.info("%s: %d runs × %d steps", tag, len(runs), len(steps))
    series = _metrics(accumulators, runs, kind, layer, view, panel) if metrics else []
    return Selection(logdir, kind, layer, view, tag, panel, runs, steps, images, captions, series)


# ---------------------------------------------------------------------- HTML
_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #202124; margin: 24px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: #5f6368; margin: 0 0 16px; } code { background: #f1f3f4; padding: 1px 4px; border-radius: 3px; }
.scroll { overflow-x: auto; }
table.grid { border-collapse: collapse; }
table.grid th, table.grid td { border: 1px solid #dadce0; padding: 6px; vertical-align: top; }
table.grid thead th { background: #f8f9fa; font-weight: 600; text-align: center; }
table.grid th.run { background: #f8f9fa; text-align: left; min-width: 9em; max-width: 220px; overflow-wrap: anywhere; }
figure { margin: 0; } figure img { display: block; image-rendering: pixelated; }
figcaption { font-size: 12px; color: #3c4043; margin-top: 4px; max-width: 520px; }
figcaption div { white-space: pre-wrap; }
td.missing { color: #9aa0a6; text-align: center; vertical-align: middle; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #dadce0; border-radius: 4px; padding: 6px; }
.chart h3 { font-size: 12px; font-weight: 600; margin: 0 0 4px; word-break: break-all; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 16px; margin: 0 0 8px; }
.swatch { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 6px; }
svg text { font: 10px system-ui, sans-serif; fill: #5f6368; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _png_size(png: bytes) -> tuple[int, int]:
    if png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size


def _display_scale(width: int, height: int) -> int:
    """Integer upscaling (pixelated) so that small pictures are seen: up to 128 px tall, 4× at most."""
    return max(1, min(4, 128 // max(height, 1), 640 // max(width, 1)))


def _cell(run: str, step: int, png: bytes, caption: list[str] | None) -> str:
    width, height = _png_size(png)
    scale = _display_scale(width, height)
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    lines = "".join(f"<div>{_e(line)}</div>" for line in caption or [])
    figcaption = f"<figcaption>{lines}</figcaption>" if lines else ""
    return (f'<td data-run="{_e(run)}" data-step="{step}"><figure>'
            f'<img src="{src}" width="{width * scale}" height="{height * scale}" '
            f'alt="{_e(run)}, step {step}" title="{_e(run)}, step {step}">{figcaption}</figure></td>')


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values spanning ``[low, high]``."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    values = []
    v = first
    while v <= high + step * 1e-9:
        values.append(round(v, 12))
        v += step
    return values


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def chart_svg(series: Series, runs: list[str], width: int = 320, height: int = 190) -> str:
    """One metric as an inline SVG line chart: a polyline per run (broken at non-finite values), labelled axes."""
    left, right, top, bottom = 44, 10, 8, 34
    points = [(s, v) for run in runs for s, v in series.runs.get(run, []) if math.isfinite(v)]
    steps = [s for run in runs for s, _ in series.runs.get(run, [])]
    x_lo, x_hi = (min(steps), max(steps)) if steps else (0, 1)
    y_lo, y_hi = (min(v for _, v in points), max(v for _, v in points)) if points else (0.0, 1.0)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * plot_w

    def y(value: float) -> float:
        return top + (1 - (value - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(series.name)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#dadce0"/>']
    for value in _ticks(y_lo, y_hi, 4):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#f1f3f4"/>')
        parts.append(f'<text x="{left - 4}" y="{y(value) + 3:.1f}" text-anchor="end">{_e(_fmt(value))}</text>')
    distinct = sorted(set(steps))
    x_ticks = distinct if 0 < len(distinct) <= 6 else _ticks(x_lo, x_hi, 5)
    for step in x_ticks:
        label = str(int(step)) if float(step).is_integer() else _fmt(step)
        parts.append(f'<line x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                     'stroke="#9aa0a6"/>')
        parts.append(f'<text x="{x(step):.1f}" y="{top + plot_h + 15}" text-anchor="middle">{_e(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">step</text>')
    for i, run in enumerate(runs):
        colour = PALETTE[i % len(PALETTE)]
        segments: list[list[tuple[int, float]]] = [[]]
        for step, value in series.runs.get(run, []):
            if math.isfinite(value):
                segments[-1].append((step, value))
            elif segments[-1]:
                segments.append([])
        parts.append(f"<g><title>{_e(run)}</title>")
        for segment in segments:
            if len(segment) > 1:
                coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in segment)
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            for s, v in segment:
                parts.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.2" fill="{colour}"/>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def report_html(selection: Selection, title: str | None = None) -> str:
    """The report page of ``selection``: self-contained HTML (no script, nothing loaded from anywhere)."""
    sel = selection
    what = f"{sel.tag}" + (f" · panel {sel.panel}" if sel.panel else "")
    title = title or f"cnnvis_tb · {sel.kind} · {sel.layer} · {sel.view}" + (f" · {sel.panel}" if sel.panel else "")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f'<p class="meta">Log dir <code>{_e(sel.logdir)}</code> · tag <code>{_e(what)}</code> · '
           f"{len(sel.runs)} runs × {len(sel.steps)} steps · {sel.count} pictures</p>",
           '<h2>Runs × steps</h2><div class="scroll"><table class="grid"><thead><tr><th>run \\ step</th>']
    out += [f"<th>{step}</th>" for step in sel.steps]
    out.append("</tr></thead><tbody>")
    for run in sel.runs:
        out.append(f'<tr><th class="run" scope="row">{_e(run)}</th>')
        for step in sel.steps:
            png = sel.images.get(run, {}).get(step)
            if png is None:
                out.append('<td class="missing">not logged</td>')
            else:
                out.append(_cell(run, step, png, sel.captions.get(run, {}).get(step)))
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if sel.metrics:
        out.append(f"<h2>Trends: {_e(sel.kind)} metrics of {_e(sel.layer)}</h2>")
        out.append('<ul class="legend">')
        for i, run in enumerate(sel.runs):
            out.append(f'<li><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                       f"{_e(run)}</li>")
        out.append('</ul><div class="charts">')
        for series in sel.metrics:
            out.append(f'<div class="chart"><h3>{_e(series.name)}</h3>{chart_svg(series, sel.runs)}</div>')
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(selection: Selection, out: str | os.PathLike) -> int:
    """Write the report page of ``selection`` to ``out``; returns the number of pictures in it."""
    page = report_html(selection)
    Path(out).write_text(page, encoding="utf-8")
    log.debug("wrote %s (%d pictures, %d charts, %.1f MB)", out, selection.count, len(selection.metrics),
             len(page) / 1e6)
    return selection.count


# ---------------------------------------------------------------------- GIF
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def gif_frames(selection: Selection, run: str | None = None, scale: int | None = None) -> list:
    """The filmstrip of ``run`` (default the first run): one RGB ``PIL.Image`` per logged step, the picture
    (upscaled ``scale``× with nearest neighbours; default so that it is at least about 128 px tall) under a white
    band holding ``step N``, all padded (white) to one size."""
    from PIL import Image, ImageDraw

    run = selection.runs[0] if run is None else run
    if run not in selection.images:
        raise ExportError(f"no run {run!r} holds {selection.tag}; available runs: {_run_listing(selection.runs)}")
    pictures = []
    for step, png in selection.images[run].items():
        with Image.open(io.BytesIO(png)) as image:
            pictures.append((step, image.convert("RGB")))
    if not pictures:
        raise ExportError(f"run {run!r} holds no picture of {selection.tag}")
    if scale is None:
        tallest = max(p.height for _, p in pictures)
        scale = max(1, min(8, -(-128 // tallest)))
    if scale != 1:
        pictures = [(s, p.resize((p.width * scale, p.height * scale), Image.NEAREST)) for s, p in pictures]
    font = _font(max(12, min(24, max(p.height for _, p in pictures) // 10)))
    labels = [f"step {step}" for step, _ in pictures]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), label, font=font) for label in labels]
    band = max(b[3] for b in boxes) + 8
    width = max(max(p.width for _, p in pictures), max(b[2] for b in boxes) + 8)
    height = band + max(p.height for _, p in pictures)
    frames = []
    for (_, picture), label in zip(pictures, labels, strict=True):
        frame = Image.new("RGB", (width, height), "white")
        frame.paste(picture, ((width - picture.width) // 2, band))
        ImageDraw.Draw(frame).text((4, 4), label, fill="black", font=font)
        frames.append(frame)
    return frames


def write_gif(selection: Selection, out: str | os.PathLike, run: str | None = None, duration: int = 500,
              scale: int | None = None) -> int:
    """Write the animated filmstrip of ``run`` (:func:`gif_frames`) to ``out``: ``duration`` ms per frame, looping
    forever; returns the number of frames."""
    if duration <= 0:
        raise ExportError(f"the frame duration must be a positive number of milliseconds, got {duration}")
    frames = gif_frames(selection, run, scale)
    # Every frame whole (no cropping to the changed area, no merged frames): one frame per logged step.
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                   optimize=False, disposal=1)
    log.debug("wrote %s (%d frames of %d×%d, %d ms each)", out, len(frames), frames[0].width, frames[0].height,
             duration)
    return len(frames)
