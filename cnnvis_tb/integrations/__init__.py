"""Integrations with training frameworks.

Each integration lives in its own module and imports its framework only when that module is imported, so
``import cnnvis_tb`` (and ``import cnnvis_tb.integrations``) needs none of them:

* :class:`~cnnvis_tb.integrations.lightning.CnnVisCallback`: a PyTorch Lightning callback
  (``pip install 'cnnvis_tb[lightning]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["CnnVisCallback"]

_EXPORTS = {"CnnVisCallback": "cnnvis_tb.integrations.lightning"}

if TYPE_CHECKING:  # pragma: no cover
    from cnnvis_tb.integrations.lightning import CnnVisCallback


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnnvis_tb.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
