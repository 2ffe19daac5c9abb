"""Fully sharded models (FSDP2 ``fully_shard``, FSDP1 ``FullyShardedDataParallel``): the logger's side of them.

Under FSDP no rank holds the whole model: each keeps a shard of every parameter (a ``DTensor`` in FSDP2, a slice of
a ``FlatParameter`` in FSDP1), and a forward pass all-gathers the shards of each unit as it runs. A forward on rank 0
alone therefore issues all-gathers the other ranks never join: gloo aborts both processes (``collective mismatch``)
or, with NCCL, rank 0 waits forever. The logger needs the model many times per logging step (the shared probe pass,
SmoothGrad's copies, Score-CAM's masked batches, activation maximization's optimizer steps, DeepDream), and kernels,
histograms and the health kind read parameters directly.

What we do (:class:`ShardedModel`): **every rank joins one gather of the full parameters per logging step, and rank
0 logs on an unsharded copy of the model**, exactly as it logs a plain model:

* *Copy.* At construction rank 0 builds a replica of the module tree with FSDP taken out: each module is a shallow
  copy of the user's module of the original class (FSDP2's ``FSDP<Class>`` subclass undone, FSDP1's wrappers
  skipped, so layer names are those of the unsharded model: ``body.0``, not ``_fsdp_wrapped_module.body.0``),
  with its own parameter and buffer tensors, its own ``training`` flags and hook tables, and none of FSDP's
  hooks (the user's own hooks stay, as they run on an unsharded model). The user's model and its shards are
  only read: parameters, optimizer state, FSDP's state, ``.grad``, modes and hooks of the sharded model are
  never written, on any rank.
* *Gather.* At each logging step every rank takes part in the same fixed sequence of collectives, chosen from
  state every rank shares (the schedule, the model's structure): FSDP2 ``DTensor.full_tensor()`` per parameter
  (and per gradient, when every rank has one; one small ``all_reduce`` agrees on that), FSDP1
  ``summon_full_params(writeback=False, rank0_only=True)`` (with gradients when the model uses
  ``use_orig_params=True``; FSDP1's flat parameters have no per-parameter gradients to show). Rank 0 copies the
  full tensors into its replica (and its own buffers: FSDP does not shard buffers, and BatchNorm statistics are
  rank 0's); the others drop them at once. Whatever fails on rank 0 while copying is kept and reported after the
  last collective, so the sequence is the same on every rank whatever happens on rank 0.
* *Log.* Rank 0 runs every kind on the replica with no collective at all (any number of forward passes), renders
  and writes; the other ranks go back to training and meet rank 0 again in their next FSDP all-gather.
* *Agree.* At the end of the logging step rank 0 broadcasts its outcome (:meth:`ShardedModel.agree`). A failure
  that reaches the training loop on rank 0 (``strict=True``, or a failed write under ``strict``) raises on every
  rank, the others with a ``RuntimeError`` naming rank 0's error, so no rank waits for a rank that is gone; a
  write failure that stops rank 0's logging (warned once) stops every rank's gathers too. Non-strict failures of
  visuals only warn on rank 0, as without FSDP. The same verdict ends the constructor: a bad option found against
  the model on rank 0 (a layer name, the log dir) raises on every rank.

Why not run the logging pass in lockstep on the sharded model? Every forward of every kind would then be a
distributed forward with its own all-gathers, on every rank: activation maximization's hundreds of optimizer
steps, SmoothGrad's copies and Score-CAM's batches would cost one all-gather of the whole model each and stall
every rank for the whole logging step (not just rank 0); the kinds that read weights would each need their own
gathers; and a visual that fails or branches on rank 0 only would desynchronize the ranks. The gather costs one
all-gather of the parameters per logging step (the communication of one sharded forward), whatever the kinds do.

Cost: per logging step, the bytes of the full parameters (and gradients) move once to every rank; transient memory
on the other ranks is one full parameter at a time (FSDP2) or nothing beyond FSDP's own unshard (FSDP1,
``rank0_only``). Rank 0 keeps the replica: the full parameters (and gradients) of the model on its device, for the
whole run. For CNNs this is small; a model whose full parameters do not fit on one device cannot be visualized
this way. The other ranks wait for rank 0's logging at their next collective (as they wait for any slow rank):
keep a logging step shorter than the process group's timeout, or use ``actmax_background=True`` for long
activation maximization. Every process of the default process group must build the ``VisLogger`` and call
``step`` / ``log_now`` with the same arguments; only global rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ShardedModel", "sharding", "is_logging_rank"]

log = logging.getLogger("cnnvis_tb")

#: Hook tables of a module; the ``*_with_kwargs`` / ``*_always_called`` ones are keyed like their main table.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_HOOK_COMPANIONS = {
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
}
#: Attributes FSDP sets on the modules it manages (and the composable API's state tables).
_FSDP_ATTRIBUTES = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_COMPOSABLE_STATE_PREFIX = "__composable_api_state_key"


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def is_logging_rank() -> bool:
    """Only global rank 0 of an initialized process group writes (every rank would otherwise write its own files)."""
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def _fsdp_classes() -> tuple[type, type]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return FSDPModule, FullyShardedDataParallel


def sharding(model: nn.Module) -> str | None:
    """``"fsdp2"`` (``fully_shard`` modules or ``DTensor`` parameters), ``"fsdp1"`` (``FullyShardedDataParallel``)
    or None (a model every rank holds whole, or no process group)."""
    if _dist() is None:
        return None
    try:
        fsdp2, fsdp1 = _fsdp_classes()
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without FSDP
        return None
    found = set()
    for module in model.modules():
        if isinstance(module, fsdp1):
            found.add("fsdp1")
        elif isinstance(module, fsdp2) or any(isinstance(p, DTensor) for p in module._parameters.values()):
            found.add("fsdp2")
    if len(found) > 1:
        raise ValueError(
            "the model mixes FullyShardedDataParallel (FSDP1) and fully_shard / DTensor (FSDP2) "
            "modules; cnnvis_tb gathers one kind of sharded model: use one of the two APIs"
        )
    return found.pop() if found else None


def _plain_class(cls: type) -> type:
    """The user's class of a module FSDP2 turned into ``FSDP<Class>`` (``FSDPModule`` first among its bases)."""
    fsdp2, _ = _fsdp_classes()
    if not issubclass(cls, fsdp2):
        return cls
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, fsdp2):
            return base
    raise TypeError(f"cannot find the module class under {cls.__name__}")  # pragma: no cover


def _hook_owner(hook: object) -> str:
    hook = getattr(hook, "func", hook)  # functools.partial
    return getattr(hook, "__module__", None) or ""


def _is_fsdp_hook(hook: object) -> bool:
    return _hook_owner(hook).startswith("torch.distributed.")


class ShardedModel:
    """The gather-and-copy machinery for one sharded model (see the module docs).

    Build it on every rank (a collective: the replica is filled once); :attr:`replica` is the unsharded copy on
    rank 0 and None elsewhere; :meth:`gather` refreshes it (a collective); :meth:`agree` ends a logging step or the
    constructor with rank 0's outcome on every rank (a collective).
    """

    def __init__(self, model: nn.Module, flavour: str) -> None:
        self.model, self.flavour = model, flavour
        dist = _dist()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0
        #: Set on every rank once rank 0 has stopped logging (a failed write): no more gathers.
        self.stopped = False
        #: ``(user's module, replica module)`` for every module of the model (FSDP1 wrappers excluded), in one fixed
        #: order; built on every rank, the replica modules only on rank 0 (None elsewhere).
        self._pairs: list[tuple[nn.Module, nn.Module | None]] = []
        self._replica_params: dict[object, nn.Parameter] = {}
        if flavour == "fsdp1":
            self._check_fsdp1_root(model)
            _, fsdp1 = _fsdp_classes()
            units = fsdp1.fsdp_modules(model)
            self._fsdp1 = fsdp1
            #: Gradients can be gathered per parameter only with ``use_orig_params=True`` (the same on every rank).
            self._with_grads = bool(units) and all(getattr(u, "_use_orig_params", False) for u in units)
        self.replica = self._clone(model, {}) if self.is_rank0 else None
        if not self.is_rank0:
            self._collect_pairs(model, set())

    # ------------------------------------------------------------------ structure
    def _check_fsdp1_root(self, model: nn.Module) -> None:
        """Every ``FlatParameter`` must belong to an FSDP unit inside ``model`` (else its parameters are unreachable:
        the model is the inside of an FSDP root, e.g. a LightningModule wrapped by the strategy)."""
        _, fsdp1 = _fsdp_classes()
        owned = {id(m._fsdp_wrapped_module) for m in model.modules() if isinstance(m, fsdp1)}
        orphans = [name for name, m in model.named_modules() if "_flat_param" in m._parameters and id(m) not in owned]
        if orphans:
            raise ValueError(
                f"the flat parameters of {orphans[:3]} belong to a FullyShardedDataParallel wrapper around the model "
                "given; pass the outermost FullyShardedDataParallel module (the one you train) to VisLogger"
            )

    def _unwrapped(self, module: nn.Module) -> nn.Module:
        if self.flavour == "fsdp1":
            while isinstance(module, self._fsdp1):
                module = module._fsdp_wrapped_module
        return module

    def _collect_pairs(self, module: nn.Module, seen: set[int]) -> None:
        """The same traversal as :meth:`_clone`, without copies (ranks other than 0)."""
        module = self._unwrapped(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        for child in module._modules.values():
            if child is not None:
                self._collect_pairs(child, seen)
        self._pairs.append((module, None))

    def _clone(self, module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
        """A shallow copy of ``module``'s tree without FSDP: own parameter, buffer, child and hook tables."""
        module = self._unwrapped(module)
        if id(module) in memo:  # a module used twice stays one module
            return memo[id(module)]
        cls = _plain_class(type(module))
        clone = cls.__new__(cls)
        state = {
            k: v
            for k, v in module.__dict__.items()
            if k not in _FSDP_ATTRIBUTES and not k.startswith(_COMPOSABLE_STATE_PREFIX)
        }
        state["_parameters"] = {}
        state["_buffers"] = {}
        state["_modules"] = {}
        state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
        for table in _HOOK_TABLES:
            if table in state:
                state[table] = OrderedDict((k, h) for k, h in state[table].items() if not _is_fsdp_hook(h))
        for table, main in _HOOK_COMPANIONS.items():
            if table in state:
                state[table] = type(state[table])((k, v) for k, v in state[table].items() if k in state[main])
        clone.__dict__.update(state)
        memo[id(module)] = clone
        for name, child in module._modules.items():
            clone._modules[name] = None if child is None else self._clone(child, memo)
        self._pairs.append((module, clone))
        return clone

    # ------------------------------------------------------------------ gather
    def gather(self) -> BaseException | None:
        """Refresh rank 0's replica from the shards; a collective every rank must call at the same point.

        Returns what failed on rank 0 while copying (None when all went well); collectives raise as they do.
        """
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            error = self._gather_fsdp1() if self.flavour == "fsdp1" else self._gather_fsdp2()
            if self.is_rank0 and error is None:
                error = self._safely(self._copy_buffers)
        log.debug("cnnvis_tb: gathered the full parameters of the sharded model in %.3f s", time.perf_counter() - start)
        return error

    @staticmethod
    def _safely(fn) -> BaseException | None:
        try:
            fn()
        except Exception as e:  # kept for after the last collective
            return e
        return None

    def _gather_fsdp2(self) -> BaseException | None:
        from torch.distributed.tensor import DTensor

        dist = _dist()
        entries = []  # (replica module, name, parameter), each parameter once
        ties = []  # (replica module, name, parameter) of a parameter met before: the replica ties it too
        seen: set[int] = set()
        for module, clone in self._pairs:
            for name, param in module._parameters.items():
                if param is None:
                    if clone is not None:
                        clone._parameters[name] = None
                elif id(param) in seen:
                    if clone is not None:
                        ties.append((clone, name, param))
                else:
                    seen.add(id(param))
                    entries.append((clone, name, param))
        # Gradients are gathered where every rank has one (the collectives must match).
        has_grad = torch.tensor([p.grad is not None for _, _, p in entries], dtype=torch.int32)
        if len(entries):
            dist.all_reduce(has_grad, op=dist.ReduceOp.MIN)
        error = None
        for (clone, name, param), with_grad in zip(entries, has_grad.tolist(), strict=True):
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            grad = None
            if with_grad:
                grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad.detach()
            if clone is not None and error is None:
                error = self._safely(
                    lambda c=clone, n=name, f=full, g=grad, p=param: self._store(c, n, f, g, p.requires_grad, key=id(p))
                )
        if self.is_rank0 and error is None:
            error = self._safely(lambda: self._tie(ties))
        return error

    def _tie(self, ties) -> None:
        for clone, name, param in ties:
            clone.__dict__.pop(name, None)
            clone._parameters[name] = self._replica_params[id(param)]

    def _gather_fsdp1(self) -> BaseException | None:
        error = None
        with self._fsdp1.summon_full_params(
            self.model, recurse=True, writeback=False, rank0_only=True, with_grads=self._with_grads
        ):
            if self.is_rank0:

                def copy_all() -> None:
                    for module, clone in self._pairs:
                        for name, param in module._parameters.items():
                            if name == "_flat_param":
                                continue
                            if param is None:
                                clone._parameters[name] = None
                                continue
                            self._store(clone, name, param, param.grad, param.requires_grad, key=(id(clone), name))

                error = self._safely(copy_all)
        return error

    def _store(
        self,
        clone: nn.Module,
        name: str,
        full: torch.Tensor,
        grad: torch.Tensor | None,
        requires_grad: bool,
        *,
        key: object,
    ) -> None:
        """Copy one full parameter (and its gradient) into the replica, keeping the replica's tensor when it fits."""
        param = self._replica_params.get(key)
        if param is None or param.shape != full.shape or param.dtype != full.dtype or param.device != full.device:
            param = nn.Parameter(full.detach().clone(), requires_grad=requires_grad)
            self._replica_params[key] = param
        else:
            param.copy_(full)
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        if clone._parameters.get(name) is not param:
            clone.__dict__.pop(name, None)  # FSDP1 keeps plain-tensor views of its flat parameter there
            clone._parameters[name] = param
        param.grad = None if grad is None else grad.detach().to(param.dtype).clone()

    def _copy_buffers(self) -> None:
        """Rank 0's own buffers (FSDP shards parameters only; BatchNorm statistics are each rank's own)."""
        for module, clone in self._pairs:
            for name, buffer in module._buffers.items():
                mine = clone._buffers.get(name)
                if buffer is None:
                    clone._buffers[name] = None
                elif (
                    mine is not None
                    and mine.shape == buffer.shape
                    and mine.dtype == buffer.dtype
                    and (mine.device == buffer.device)
                ):
                    mine.copy_(buffer)
                else:
                    clone.__dict__.pop(name, None)
                    clone._buffers[name] = buffer.detach().clone()

    # ------------------------------------------------------------------ agreement
    def agree(
        self, failure: str | None = None, *, stopped: bool = False, info: object = None, what: str = "logging"
    ) -> object:
        """Rank 0's outcome on every rank (a collective): returns rank 0's ``info``. On the other ranks a ``failure``
        of rank 0 raises ``RuntimeError``; ``stopped`` (rank 0 stopped writing) stops the gathers everywhere."""
        dist = _dist()
        message = [(failure, bool(stopped), info) if self.is_rank0 else None]
        dist.broadcast_object_list(message, src=0)
        failure, stopped, info = message[0]
        self.stopped = self.stopped or stopped
        if failure is not None and not self.is_rank0:
            raise RuntimeError(f"cnnvis_tb: {what} failed on rank 0 ({failure}); every rank stops with it")
        return info
