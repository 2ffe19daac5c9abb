"""Constants shared by the "CNN Vis" plugin's loader and its routes."""

from __future__ import annotations

#: Name of the plugin: its routes live under ``/data/plugin/cnnvis/``.
PLUGIN_NAME = "cnnvis"

#: Title of the tab in TensorBoard's navigation bar.
TAB_NAME = "CNN Vis"

#: Summary plugin that owns the images we read (``SummaryWriter.add_image`` writes them).
IMAGES_PLUGIN_NAME = "images"

#: Summary plugin that owns ``SummaryWriter.add_text`` output (the layer table).
TEXT_PLUGIN_NAME = "text"

#: Number of image steps per tag TensorBoard keeps when the user did not say otherwise, and the
#: ``downsample`` the plugin asks the data provider for. TensorBoard's own default is 10 (reservoir
#: sampling), which hides most of a training run; this is "every step" for any realistic log while
#: staying a finite number, which both the Python multiplexer and the Rust data server accept
#: (their reservoirs allocate as records arrive, not up front).
ALL_STEPS = 1_000_000
