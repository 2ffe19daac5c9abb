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
:func:`cnnvis_tb.hooks.capture` and removed in its ``finally``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved", "single_threaded", "model_device", "model_dtype", "frozen_copy", "FrozenCopies"]


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


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _own_state_hook(hook: object) -> bool:
    """A hook that only recomputes its module's own parameters (weight / spectral normalization, pruning): on a copy
    it touches the copy alone."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def foreign_hooks(net: nn.Module) -> str | None:
    """Where ``net`` has hooks of its user's (forward, pre-forward, backward; on a module or global), described in
    a few words, or None. A copy of the model carries them along, and on another thread they would fire at moments
    the training loop cannot foresee, writing into the user's objects; work that runs the model must then stay on
    the training thread, inside ``vis.step()``."""
    from torch.nn.modules import module as module_globals

    for attr in _HOOK_DICTS:
        if any(not _own_state_hook(h) for h in getattr(module_globals, "_global" + attr, {}).values()):
            return f"global module hooks ({attr.strip('_').replace('_', ' ')})"
    for name, module in net.named_modules():
        for attr in _HOOK_DICTS:
            if any(not _own_state_hook(h) for h in getattr(module, attr, {}).values()):
                return f"{attr.strip('_').replace('_', ' ')} on {name or 'the model itself'!r}"
    return None


def rng_states(net: nn.Module) -> tuple[torch.Tensor, ...]:
    """The global RNG states ``net``'s forward may draw from: the CPU generator's and its CUDA device's."""
    device = model_device(net)
    states = (torch.get_rng_state(),)
    if device.type == "cuda":
        states += (torch.cuda.get_rng_state(device),)
    return states


def same_rng(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def frozen_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of the model for work on another thread (eval mode, no gradients, no ``.grad``): what it runs
    reads nothing the training loop changes afterwards. It costs one more copy of the parameters and buffers while
    it lives."""
    with torch.no_grad():
        snapshot = copy.deepcopy(net)
    for p in snapshot.parameters():
        p.grad = None
        p.requires_grad_(False)
    return snapshot.eval()


def _state(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(itertools.chain(net.named_parameters(), net.named_buffers()))


class FrozenCopies:
    """:func:`frozen_copy` of one model, reused: :meth:`take` refreshes a copy handed back earlier in place (its
    parameters and buffers copied from the model's, far cheaper than a new deep copy of the module tree) and makes a
    new one only when none is free or the model's parameters and buffers changed in name, shape, dtype or device.
    What the refresh does not carry over is the rest of the modules' state (plain attributes): it is that of the
    first copy. Thread-safe; as many copies live as are taken at once."""

    def __init__(self) -> None:
        self._free: list[tuple[nn.Module, list[tuple[str, torch.Tensor]]]] = []
        #: The copies taken and not given back, by identity (a model may define ``__eq__``), with their state; the
        #: entry goes with the copy (one never given back, after a failure, is freed with its last use).
        self._state: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._watched: set[int] = set()  # copies with a finalizer that forgets them
        self._lock = threading.RLock()
        _all_copies.add(self)

    def take(self, net: nn.Module) -> nn.Module:
        """A frozen copy of ``net`` as it is now."""
        with self._lock:
            free = self._free.pop() if self._free else None
        if free is not None:
            snapshot, state = free
            live = _state(net)
            if len(live) == len(state) and all(
                    a == b and s.shape == t.shape and s.dtype == t.dtype and s.device == t.device
                    for (a, s), (b, t) in zip(state, live, strict=True)):
                with torch.no_grad():
                    torch._foreach_copy_([s for _, s in state], [t.detach() for _, t in live])
                self._taken(snapshot, state)
                return snapshot
        snapshot = frozen_copy(net)
        self._taken(snapshot, _state(snapshot))
        return snapshot

    def _taken(self, snapshot: nn.Module, state: list[tuple[str, torch.Tensor]]) -> None:
        key = id(snapshot)
        with self._lock:
            self._state[key] = state
            new = key not in self._watched
            self._watched.add(key)
        if new:  # once per copy (a copy is taken again at every logging step); weakly, not to keep us alive
            weakref.finalize(snapshot, FrozenCopies._forget, weakref.ref(self), key)

    @staticmethod
    def _forget(copies: weakref.ref[FrozenCopies], key: int) -> None:
        self = copies()
        if self is not None:
            with self._lock:  # (reentrant: a copy may be freed while the lock is held, in clear())
                self._state.pop(key, None)
                self._watched.discard(key)

    def give_back(self, snapshot: nn.Module) -> None:
        """``snapshot`` (from :meth:`take`) is no longer used: the next :meth:`take` may refresh it."""
        with self._lock:
            state = self._state.pop(id(snapshot), None)
            if state is not None:
                self._free.append((snapshot, state))

    def clear(self) -> None:
        """Forget the free copies (their memory is released once nothing else holds them)."""
        with self._lock:
            self._free.clear()


#: Every :class:`FrozenCopies`, for a forked process: a lock a thread of the parent held there stays locked.
_all_copies: weakref.WeakSet[FrozenCopies] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for copies in list(_all_copies):
        copies._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)
