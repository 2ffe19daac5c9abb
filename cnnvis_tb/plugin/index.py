"""The ``/index`` answer: the runs holding cnnvis images, and their kind -> layer -> view tree, labelled and ordered.

Which kinds exist is the data's to say: any kind name found in an image tag is listed (a user's own
kind as much as a built-in one). Each kind's label and the order of the kinds come from the kinds
tables the logger writes once per run (:func:`cnnvis_tb.tags.kinds_table`):

* a kind takes its label from the first run, in natural run order, whose table lists it; a kind no
  table lists is labelled with its name;
* kinds listed in tables come first, in the order of the first run whose table lists them, then the
  kinds no table lists, by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tensorboard.context import RequestContext
from tensorboard.data import provider

from cnnvis_tb import tags
from cnnvis_tb.plugin import metadata
from cnnvis_tb.plugin.texts import text_of

__all__ = ["MAX_LABEL_CHARS", "read_index", "read_kinds_tables", "kind_order", "build_index", "natural_key"]

#: Longest label shown on a kind button; a longer one (the table is user data) is cut with "…".
MAX_LABEL_CHARS = 80

_NATURAL_CHUNK = re.compile(r"([0-9]+)", re.ASCII)


def read_index(data_provider: provider.DataProvider, ctx: RequestContext, experiment: str) -> dict[str, Any]:
    """The ``/index`` answer for one experiment, read through ``data_provider`` (see `build_index`)."""
    mapping = data_provider.list_blob_sequences(ctx, experiment_id=experiment, plugin_name=metadata.IMAGES_PLUGIN_NAME)
    runs_by_tag: dict[str, list[str]] = {}
    for run, tag_to_series in mapping.items():
        for tag in tag_to_series:
            if metadata.image_tag_parts(tag):
                runs_by_tag.setdefault(tag, []).append(run)
    if not runs_by_tag:  # nothing to label: spare the text read
        return build_index({})
    return build_index(runs_by_tag, read_kinds_tables(data_provider, ctx, experiment))


def read_kinds_tables(
    data_provider: provider.DataProvider, ctx: RequestContext, experiment: str
) -> dict[str, list[tags.KindInfo]]:
    """Run -> the kinds its latest kinds table lists, in the table's order (runs without one are left out)."""
    mapping = data_provider.read_tensors(
        ctx,
        experiment_id=experiment,
        plugin_name=metadata.TEXT_PLUGIN_NAME,
        downsample=1,  # keeps the latest value of each tag
        run_tag_filter=provider.RunTagFilter(tags=metadata.KINDS_TABLE_TAGS),
    )
    tables: dict[str, list[tags.KindInfo]] = {}
    for run, tag_to_data in mapping.items():
        latest = max(
            (data[-1] for data in tag_to_data.values() if data),
            key=lambda datum: (datum.step, datum.wall_time),
            default=None,
        )
        if latest is not None:
            tables[run] = tags.parse_kinds_table(text_of(latest.numpy))
    return tables


def _label(label: str, name: str) -> str:
    label = " ".join(label.split()) or name
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def kind_order(kinds: Iterable[str], tables: Mapping[str, Sequence[tags.KindInfo]]) -> list[tags.KindInfo]:
    """``kinds`` labelled and ordered by the kinds ``tables`` of the runs (run -> its table), as the module says."""
    wanted = set(kinds)
    listed: dict[str, str] = {}
    for run in sorted(tables, key=natural_key):
        for info in tables[run]:
            if info.name in wanted and info.name not in listed:
                listed[info.name] = _label(info.label, info.name)
    unlisted = sorted(wanted - listed.keys(), key=natural_key)
    return [tags.KindInfo(name, label) for name, label in listed.items()] + [
        tags.KindInfo(name, name) for name in unlisted
    ]


def natural_key(text: str) -> tuple[list[tuple[int, Any]], str]:
    """Sort key ordering embedded numbers by value: ``features.3`` before ``features.10``."""
    # split() with a capturing group puts the digit runs at the odd positions.
    chunks = _NATURAL_CHUNK.split(text)
    return [(0, int(chunk)) if i % 2 else (1, chunk) for i, chunk in enumerate(chunks) if chunk], text


def _view_key(view: str) -> tuple[bool, int, tuple[list[tuple[int, Any]], str]]:
    probe = tags.probe_index(view)
    return (probe is None, probe or 0, natural_key(view))


def build_index(
    runs_by_tag: Mapping[str, Iterable[str]], kinds_tables: Mapping[str, Sequence[tags.KindInfo]] | None = None
) -> dict[str, Any]:
    """The ``/index`` answer for cnnvis image tags mapped to the runs holding them.

    Shape: ``{"runs": [run], "kinds": [{"kind", "label", "layers": [{"layer", "views": [{"view",
    "probe", "tag", "runs": [run]}]}]}]}``. Kinds are labelled and ordered by ``kinds_tables`` (run ->
    the kinds its table lists, see `kind_order`), layers and runs come in natural order, probe views
    by probe index and before the other views. Lists (not objects) keep that order in JavaScript
    whatever the names (a layer called ``0`` would otherwise jump ahead). Tags that are not cnnvis
    image tags are ignored.
    """
    tree: dict[str, dict[str, dict[str, tuple[str, list[str]]]]] = {}
    all_runs: set[str] = set()
    for tag, runs in runs_by_tag.items():
        parts = metadata.image_tag_parts(tag)
        if parts is None:
            continue
        run_list = sorted(set(runs), key=natural_key)
        all_runs.update(run_list)
        views = tree.setdefault(parts.kind, {}).setdefault(parts.layer, {})
        views[parts.view] = (tag, run_list)
    kinds = [
        {
            "kind": kind,
            "label": label,
            "layers": [
                {
                    "layer": layer,
                    "views": [
                        {"view": view, "probe": tags.probe_index(view), "tag": tag, "runs": runs}
                        for view, (tag, runs) in sorted(tree[kind][layer].items(), key=lambda item: _view_key(item[0]))
                    ],
                }
                for layer in sorted(tree[kind], key=natural_key)
            ],
        }
        for kind, label in kind_order(tree, kinds_tables or {})
    ]
    return {"runs": sorted(all_runs, key=natural_key), "kinds": kinds}
