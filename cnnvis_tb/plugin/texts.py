"""The cnnvis text summaries of a run (the layer table, the kinds table), as the ``/text`` route answers them."""

from __future__ import annotations

from typing import Any

from tensorboard import errors
from tensorboard.context import RequestContext
from tensorboard.data import provider

from cnnvis_tb import tags
from cnnvis_tb.plugin import metadata
from cnnvis_tb.plugin.args import quote

__all__ = ["read_texts", "read_panels", "text_of"]


def read_texts(data_provider: provider.DataProvider, ctx: RequestContext, experiment: str, run: str) -> dict[str, Any]:
    """The ``/text`` answer: ``{"run", "texts": [{"tag", "step", "text"}]}``, the latest value of each summary tag.

    Raises `errors.NotFoundError` when no run is named ``run``.
    """
    if run not in {r.run_name for r in data_provider.list_runs(ctx, experiment_id=experiment)}:
        raise errors.NotFoundError(f"no run named {quote(run)}")
    mapping = data_provider.read_tensors(
        ctx,
        experiment_id=experiment,
        plugin_name=metadata.TEXT_PLUGIN_NAME,
        downsample=1,  # keeps the latest value of each tag
        run_tag_filter=provider.RunTagFilter(runs=[run]),
    )
    texts = [
        {"tag": tag, "step": data[-1].step, "text": text_of(data[-1].numpy)}
        for tag, data in sorted(mapping.get(run, {}).items())
        if data and metadata.is_summary_tag(tag) and tags.parse_panels_tag(tag) is None  # panels: see /panels
    ]
    return {"run": run, "texts": texts}


def text_of(value: Any) -> str:
    """A text summary's value (a numpy array of bytes or str) as one string, one line per element."""
    return "\n".join(
        item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in value.ravel()
    )


def read_panels(
    data_provider: provider.DataProvider, ctx: RequestContext, experiment: str, run: str, tag: str
) -> dict[str, Any]:
    """The ``/panels`` answer: ``{"run", "tag", "steps": {step: [{"key", "box", "text"}]}}``, the panel records of
    image ``tag`` in ``run`` at every step that has them (:func:`cnnvis_tb.tags.panels_tag`; ``{}`` when the kind
    writes none)."""
    parts = tags.parse_tag(tag)
    panels = tags.panels_tag(parts.kind, parts.layer)
    mapping = data_provider.read_tensors(
        ctx,
        experiment_id=experiment,
        plugin_name=metadata.TEXT_PLUGIN_NAME,
        downsample=metadata.ALL_STEPS,
        run_tag_filter=provider.RunTagFilter(runs=[run], tags=[panels + "/text_summary", panels]),
    )
    steps: dict[str, list[dict]] = {}
    for data in mapping.get(run, {}).values():
        for datum in data:
            records = tags.parse_panels_text(text_of(datum.numpy)).get(parts.view)
            if records:
                steps[str(datum.step)] = records
    return {"run": run, "tag": tag, "steps": steps}
