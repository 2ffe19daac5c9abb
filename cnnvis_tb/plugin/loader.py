"""Loader of the "CNN Vis" plugin, named by the ``tensorboard_plugins`` entry point.

Kept apart from the plugin module, as TensorBoard recommends, so that importing it is cheap and
cannot fail; the plugin itself is imported only when TensorBoard loads it.
"""

from __future__ import annotations

import argparse

from tensorboard.plugins import base_plugin

from cnnvis_tb.plugin import metadata


class CnnVisLoader(base_plugin.TBLoader):
    """Makes TensorBoard keep every logged image step, then builds :class:`CnnVisPlugin`."""

    def fix_flags(self, flags: argparse.Namespace) -> None:
        """Default ``--samples_per_plugin images=`` (and ``text=``) to "all steps" unless the user set it.

        ``flags.samples_per_plugin`` is the dict parsed from ``--samples_per_plugin`` (``{}`` when
        the flag is absent). TensorBoard hands it to the Rust data server as
        ``--samples-per-plugin`` and to the Python multiplexer as its tensor size guidance, and to
        every plugin as ``context.sampling_hints``; so this one default reaches both loaders and
        the stock Images tab shows every step too. An explicit user value always wins.
        """
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(metadata.IMAGES_PLUGIN_NAME, metadata.ALL_STEPS)
            # The panel records beside the images are texts, one per logging step: keep them all too.
            samples.setdefault(metadata.TEXT_PLUGIN_NAME, metadata.ALL_STEPS)

    def load(self, context: base_plugin.TBContext) -> base_plugin.TBPlugin:
        """Returns the plugin bound to TensorBoard's data provider."""
        from cnnvis_tb.plugin.cnnvis_plugin import CnnVisPlugin

        return CnnVisPlugin(context)
