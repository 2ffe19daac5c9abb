"""Constants shared by the "CNN Vis" plugin's loader and its routes, and which tags the tab reads.

The tag scheme itself belongs to :mod:`cnnvis_tb.tags` (the writer side imports it too); this module
only says which of those tags the plugin serves. It imports neither torch nor TensorBoard.
"""

from __future__ import annotations

from cnnvis_tb import tags

__all__ = [
    "PLUGIN_NAME",
    "TAB_NAME",
    "IMAGES_PLUGIN_NAME",
    "TEXT_PLUGIN_NAME",
    "ALL_STEPS",
    "KINDS_TABLE_TAGS",
    "image_tag_parts",
    "is_summary_tag",
]

#: Name of the plugin: its routes live under ``/data/plugin/cnnvis/``.
PLUGIN_NAME = "cnnvis"

#: Title of the tab in TensorBoard's navigation bar.
TAB_NAME = "CNN Vis"

#: Summary plugin that owns the images we read (``SummaryWriter.add_image`` writes them).
IMAGES_PLUGIN_NAME = "images"

#: Summary plugin that owns ``SummaryWriter.add_text`` output (the layer table, the kinds table).
TEXT_PLUGIN_NAME = "text"

#: Number of image steps per tag TensorBoard keeps when the user did not say otherwise, and the
#: ``downsample`` the plugin asks the data provider for. TensorBoard's own default is 10 (reservoir
#: sampling), which hides most of a training run; this is "every step" for any realistic log while
#: staying a finite number, which both the Python multiplexer and the Rust data server accept
#: (their reservoirs allocate as records arrive, not up front).
ALL_STEPS = 1_000_000

#: Stored tags of a run's kinds table: ``SummaryWriter.add_text`` appends ``/text_summary`` to the
#: tag it is given; ``tf.summary.text`` keeps the tag as given.
KINDS_TABLE_TAGS = (tags.KINDS_TABLE_TAG + "/text_summary", tags.KINDS_TABLE_TAG)


def image_tag_parts(tag: str) -> tags.TagParts | None:
    """The parts of ``tag`` when it can be a cnnvis image tag (``cnnvis/<kind>/<layer>/<view>``), else ``None``.

    Any valid kind name is accepted, a user's own kind as much as a built-in one: which kinds hold
    images is the data's to say, not a list of ours.
    """
    parts = tags.parse_tag(tag)
    return parts if parts is not None and parts.kind != "summary" else None


def is_summary_tag(tag: str) -> bool:
    """Whether ``tag`` is a cnnvis text summary (``cnnvis/summary/...``)."""
    parts = tags.parse_tag(tag)
    return parts is not None and parts.kind == "summary"
