"""The visual kinds: one module each (its maths, its rendering and its :class:`Kind`), and the registry.

The registry below is the one place that lists the built-in kinds; its order is the order in which a logging
step computes them and in which the CNN Vis tab lists them. A user's own kind is a :class:`Kind` subclass passed
in ``VisLogger(kinds=[...])`` and needs no entry here.
"""

from __future__ import annotations

from cnnvis_tb.kinds.actmax import ActMax
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext
from cnnvis_tb.kinds.deepdream import DeepDream
from cnnvis_tb.kinds.features import Features
from cnnvis_tb.kinds.gradcam import GradCam
from cnnvis_tb.kinds.health import Health
from cnnvis_tb.kinds.histograms import Histograms
from cnnvis_tb.kinds.kernels import Kernels
from cnnvis_tb.kinds.saliency import Saliency

__all__ = ["BUILTIN", "ALL_KINDS", "DEFAULT_KINDS", "DEFAULT_EVERY", "Kind", "Needs", "ModelInfo", "StepContext",
           "Output", "GradCam", "Features", "Kernels", "ActMax", "DeepDream", "Saliency", "Histograms", "Health"]

#: name -> class of every built-in kind, in the tab's order.
BUILTIN: dict[str, type[Kind]] = {
    kind.name: kind
    for kind in (
        GradCam,
        Features,
        Kernels,
        ActMax,
        DeepDream,
        Saliency,
        Histograms,
        Health,
    )
}
#: Every built-in kind's name.
ALL_KINDS = tuple(BUILTIN)
#: Kinds logged when ``kinds`` is not given.
DEFAULT_KINDS = tuple(name for name, kind in BUILTIN.items() if kind.on_by_default)
#: Steps between two logs of each built-in kind when ``every`` does not say.
DEFAULT_EVERY = {name: kind.every for name, kind in BUILTIN.items()}
