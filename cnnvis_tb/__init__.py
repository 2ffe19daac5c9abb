"""cnnvis_tb: see what a convolutional network learns while it trains, in TensorBoard.

Top-level names are loaded lazily so that importing the package (as TensorBoard does for the
"CNN Vis" plugin) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "VisLogger": "cnnvis_tb.logger",
    "Kind": "cnnvis_tb.kinds.base",
    "Needs": "cnnvis_tb.kinds.base",
    "StepContext": "cnnvis_tb.kinds.base",
    "Output": "cnnvis_tb.kinds.base",
    "grad_cam": "cnnvis_tb.kinds.gradcam",
    "cam": "cnnvis_tb.kinds.gradcam",
    "kernel_grid": "cnnvis_tb.kinds.kernels",
    "feature_maps": "cnnvis_tb.kinds.features",
    "activation_maximization": "cnnvis_tb.kinds.actmax",
    "deep_dream": "cnnvis_tb.kinds.deepdream",
    "saliency": "cnnvis_tb.kinds.saliency",
    "overlay_heatmap": "cnnvis_tb.render",
    "colorize": "cnnvis_tb.render",
    "make_grid": "cnnvis_tb.render",
    "layer_table": "cnnvis_tb.layers",
    "find_layers": "cnnvis_tb.layers",
}

__all__ = [
    "VisLogger",
    "Kind",
    "Needs",
    "Output",
    "StepContext",
    "activation_maximization",
    "cam",
    "colorize",
    "deep_dream",
    "feature_maps",
    "find_layers",
    "grad_cam",
    "kernel_grid",
    "layer_table",
    "make_grid",
    "overlay_heatmap",
    "saliency",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from cnnvis_tb.kinds.actmax import activation_maximization
    from cnnvis_tb.kinds.base import Kind, Needs, Output, StepContext
    from cnnvis_tb.kinds.deepdream import deep_dream
    from cnnvis_tb.kinds.features import feature_maps
    from cnnvis_tb.kinds.gradcam import cam, grad_cam
    from cnnvis_tb.kinds.kernels import kernel_grid
    from cnnvis_tb.kinds.saliency import saliency
    from cnnvis_tb.layers import find_layers, layer_table
    from cnnvis_tb.logger import VisLogger
    from cnnvis_tb.render import colorize, make_grid, overlay_heatmap


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnnvis_tb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
