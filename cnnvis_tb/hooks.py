"""Forward hooks in one place: what a layer produced, recorded during a pass and removed after it.

Every hook cnnvis_tb puts on the user's model is registered by :func:`capture` and removed in its ``finally``,
also when the forward pass raises, so no hook outlives the logging step that needed it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["capture", "first_tensor", "StopForward", "OWN"]

#: Suffix of the key under which :func:`capture` records a layer's own output (see its ``own`` argument).
OWN = ":own"


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a layer produced: the output itself, or the first 4-D (else first) tensor of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    items = list(output.values()) if isinstance(output, dict) else list(output) if isinstance(
        output, (tuple, list)
    ) else []
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    four_d = [t for t in tensors if t.dim() == 4]
    return (four_d or tensors or [None])[0]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every layer of interest has produced its output."""


@contextlib.contextmanager
def capture(
    modules: dict[str, nn.Module],
    *,
    for_grad: bool = False,
    stop_after: str | None = None,
    stop_before: dict[str, nn.Module] | None = None,
    own: tuple[str, ...] | frozenset[str] = (),
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output tensor of each module in ``modules`` during the forward passes run in the body.

    Args:
        modules: ``{name: module}`` to hook.
        for_grad: keep the recorded tensors in the autograd graph so gradients can be taken with respect to
            them. The layer then passes on a copy of its output, which is what is recorded: an in-place op after it
            (``ReLU(inplace=True)``) shows in the recorded activation, as the network consumes it, and the layer's
            own output tensor is left unmodified. Without ``for_grad`` a detached copy of the output as the layer
            produced it is kept.
        stop_after: name of a module after whose output the forward pass is cut short with :class:`StopForward`
            (which this context swallows); saves the rest of the network when only early layers matter.
        own: names (of ``modules``, with ``for_grad``) whose own output is also recorded, as ``"<name>:own"``
            (:data:`OWN`): the tensor as the layer produced it, in the graph and untouched by a following in-place
            op, so its gradient is that of the layer's output itself (FullGrad's bias terms).
        stop_before: ``{name: module}`` (one entry): record the module's input as ``"<name>:input"`` (in the
            graph) and cut the forward pass short before the module runs.

    Yields ``{name: tensor}``, filled as the forward pass runs (the last call wins for modules called twice).
    Every hook is removed on exit, also when the body raises.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            tensor = first_tensor(output)
            if tensor is None:
                return None
            if not for_grad:
                outputs[name] = tensor.detach().clone()
                replacement = None
            else:
                # Recorded is what the rest of the network consumes: an in-place op right after the layer
                # (DenseNet's F.relu(features, inplace=True)) acts on this copy, and values and gradients are those
                # of the activation as used, as in the Grad-CAM paper (and the CAM libraries).
                passed_on = tensor.clone()
                if torch.is_grad_enabled() and not passed_on.requires_grad and passed_on.is_floating_point():
                    # Frozen layers before this one (a frozen backbone): the graph starts here, so gradients
                    # with respect to this activation still exist.
                    passed_on.requires_grad_(True)
                outputs[name] = passed_on
                if name in own:
                    outputs[name + OWN] = tensor if tensor.requires_grad else passed_on
                replacement = _replace_tensor(output, tensor, passed_on)
            if name == stop_after:
                raise StopForward(name)
            return replacement

        return hook

    def make_pre_hook(name: str):
        def pre_hook(_module, inputs):
            tensor = first_tensor(inputs)
            if tensor is not None:
                outputs[f"{name}:input"] = tensor
            raise StopForward(name)

        return pre_hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        for name, module in (stop_before or {}).items():
            handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
        try:
            yield outputs
        except StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()


def _replace_tensor(output: object, old: torch.Tensor, new: torch.Tensor) -> object:
    """``output`` with ``old`` swapped for ``new``, of the output's own type (a namedtuple, a dict subclass)."""
    if output is old:
        return new
    if isinstance(output, tuple):
        items = [new if o is old else o for o in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, list):
        return type(output)(new if o is old else o for o in output)
    if isinstance(output, dict):
        replaced = copy.copy(output)
        for key, value in output.items():
            if value is old:
                replaced[key] = new
        return replaced
    return output
