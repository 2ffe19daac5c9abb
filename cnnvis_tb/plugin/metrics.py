"""The cnnvis metric scalars of every run, as the ``/metrics`` route answers them for the trends view.

The metrics are ordinary ``SummaryWriter.add_scalar`` summaries (owned by TensorBoard's ``scalars`` plugin) under
``cnnvis/metrics/<kind>/<layer>/<name>`` (:func:`cnnvis_tb.tags.metric_tag`; ``<name>`` may hold further levels,
e.g. ``pointing/gradcam/true``). They are read through the data provider, like the images.
"""

from __future__ import annotations

import math
import re
from typing import Any

from tensorboard.context import RequestContext
from tensorboard.data import provider

from cnnvis_tb import tags
from cnnvis_tb.plugin.index import natural_key

__all__ = ["SCALARS_PLUGIN_NAME", "MAX_POINTS", "METRIC_ORDER", "read_metrics", "metric_parts", "metric_variant"]

#: Summary plugin that owns ``SummaryWriter.add_scalar`` output.
SCALARS_PLUGIN_NAME = "scalars"
#: Points per series asked of the data provider: every logging step of any realistic run.
MAX_POINTS = 10_000

_PREFIX = f"{tags.PREFIX}/metrics/"

#: Charts come in this order of their metric (the first level of the name), the others after them by name:
#: whether the map is on the object first, then how it changes the prediction, then its shape; health likewise.
METRIC_ORDER = (
    "pointing", "energy", "iou", "deletion", "insertion", "confidence_drop", "confidence_increase", "entropy",
    "stability", "agreement", "accuracy", "true_probability", "dead_fraction", "act_mean", "act_std",
    "weight_norm", "grad_norm", "update_ratio",
)
_TARGETS = ("true", "pred")
_PROBE = re.compile(r"^probe_\d+$")


def metric_parts(tag: str) -> tuple[str, str, str] | None:
    """``(kind, layer, name)`` of a cnnvis metric tag, else ``None``."""
    if not tag.startswith(_PREFIX):
        return None
    parts = tag[len(_PREFIX) :].split("/", 2)
    if len(parts) != 3 or not all(parts) or not tags.is_kind_name(parts[0]):
        return None
    return parts[0], parts[1], parts[2]


def metric_variant(name: str) -> tuple[str, dict[str, str]]:
    """The metric of a name and what varies between its series: ``"pointing/gradcam++/true/probe_003"`` ->
    ``("pointing", {"method": "gradcam++", "target": "true", "image": "probe_003"})``; the keys present are those
    the name holds (a target is ``true`` or ``pred``, an image ``probe_<n>``, the rest is the method)."""
    metric, *rest = name.split("/")
    variant: dict[str, str] = {}
    method = []
    for part in rest:
        if part in _TARGETS and "target" not in variant:
            variant["target"] = part
        elif _PROBE.match(part) and "image" not in variant:
            variant["image"] = part
        else:
            method.append(part)
    if method:
        variant["method"] = "/".join(method)
    return metric, variant


def _series_key(tag: str) -> tuple:
    kind, layer, name = metric_parts(tag)
    metric, variant = metric_variant(name)
    rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return (natural_key(kind), natural_key(layer), rank, natural_key(metric), natural_key(name))


def read_metrics(data_provider: provider.DataProvider, ctx: RequestContext, experiment: str) -> dict[str, Any]:
    """The ``/metrics`` answer: ``{"runs": [run], "series": [{"tag", "kind", "layer", "name", "metric", "variant",
    "runs": [{"run", "steps": [int], "values": [float | None]}]}]}``, every cnnvis metric of every run (``metric``
    and ``variant`` from :func:`metric_variant`), series by kind, layer, then metric (:data:`METRIC_ORDER`) and name
    in natural order (``probe_2`` before ``probe_10``), runs in natural order. Non-finite values (a metric of an
    empty map) are ``None``: JSON has no NaN."""
    listing = data_provider.list_scalars(ctx, experiment_id=experiment, plugin_name=SCALARS_PLUGIN_NAME)
    wanted = sorted({tag for series in listing.values() for tag in series if metric_parts(tag)})
    if not wanted:
        return {"runs": [], "series": []}
    mapping = data_provider.read_scalars(
        ctx,
        experiment_id=experiment,
        plugin_name=SCALARS_PLUGIN_NAME,
        downsample=MAX_POINTS,
        run_tag_filter=provider.RunTagFilter(tags=wanted),
    )
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(mapping, key=natural_key):
        for tag, data in mapping[run].items():
            if not data or not metric_parts(tag):
                continue
            points = sorted({d.step: d.value for d in data}.items())  # a rewritten step: its last value
            by_tag.setdefault(tag, []).append({
                "run": run,
                "steps": [step for step, _ in points],
                "values": [value if math.isfinite(value) else None for _, value in points],
            })
    series = []
    for tag in sorted(by_tag, key=_series_key):
        kind, layer, name = metric_parts(tag)
        metric, variant = metric_variant(name)
        series.append({"tag": tag, "kind": kind, "layer": layer, "name": name, "metric": metric, "variant": variant,
                       "runs": by_tag[tag]})
    runs = sorted({entry["run"] for s in series for entry in s["runs"]}, key=natural_key)
    return {"runs": runs, "series": series}
