"""The training-safety contract in code: everything a visual may touch is put back, also when it raises.

``preserved(model)`` wraps every computation cnnvis_tb runs on the user's model:

* every submodule's ``training`` flag is saved, the model is put in eval mode (BatchNorm uses its running
  statistics and updates nothing, dropout is off), and each flag is restored afterwards;
* the global torch RNG (CPU, and the model's CUDA device when it has one) is saved and restored;
* gradients are enabled and inference mode is off inside (a visual may need ``torch.autograd.grad`` while
  the user's loop sits in ``torch.no_grad()`` or ``torch.inference_mode()``); the outer modes come back
  on exit because they are context managers;
* autocast is disabled inside, so visuals compute in the model's own dtype (float32 for a float32 model)
  even when the user's loop runs under AMP.

Parameters' ``requires_grad`` flags and ``.grad`` tensors are never written: visuals take gradients with
``torch.autograd.grad`` with respect to activations or images only. Hooks are registered through
:func:`capture` and removed in its ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cnnvis_tb.layers import first_tensor

__all__ = ["preserved", "capture", "single_threaded", "model_device", "model_dtype", "StopForward"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter; float32 by default."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode and restore modes and RNG afterwards (see module docs)."""
    # Only the modules in training mode are switched (and switched back): the rest already are as we need.
    training = [m for m in model.modules() if m.training]
    device = model_device(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        for module in training:
            module.training = False
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for device_type in {"cpu", device.type}:
                if device_type in ("cpu", "cuda", "xpu", "mps"):
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for module in training:
            module.training = True
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small tensor work (rendering pictures of a few hundred pixels) on one intra-op thread.

    Ops on such tensors gain nothing from threads, and when the cores are busy (data-loader workers, other
    processes) the thread pool's hand-offs cost milliseconds per op instead of microseconds. The previous
    thread count is restored on exit.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every layer of interest has produced its output."""


@contextlib.contextmanager
def capture(
    modules: dict[str, nn.Module],
    *,
    for_grad: bool = False,
    stop_after: str | None = None,
    stop_before: dict[str, nn.Module] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output tensor of each module in ``modules`` during the forward passes run in the body.

    Args:
        modules: ``{name: module}`` to hook.
        for_grad: keep the recorded tensors in the autograd graph so gradients can be taken with respect to
            them. The layer then passes on a copy of its output, so an in-place op after it (``ReLU(inplace=True)``)
            changes the copy and not the recorded activation. Without ``for_grad`` a detached copy is kept.
        stop_after: name of a module after whose output the forward pass is cut short with :class:`StopForward`
            (which this context swallows); saves the rest of the network when only early layers matter.
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
                outputs[name] = tensor
                passed_on = tensor.clone()
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
    if output is old:
        return new
    if isinstance(output, tuple):
        return tuple(new if o is old else o for o in output)
    if isinstance(output, list):
        return [new if o is old else o for o in output]
    if isinstance(output, dict):
        return {k: (new if v is old else v) for k, v in output.items()}
    return output
