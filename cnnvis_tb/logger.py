"""``VisLogger``: two lines in a training loop log what the CNN learns, on a schedule, on a fixed probe batch.

The logger orchestrates and knows no kind: each visual is a :class:`~cnnvis_tb.Kind` (built-in ones in
:mod:`cnnvis_tb.kinds`). Here live the schedule, the safety guard, the one shared probe pass over the union of the
due kinds' needs (:mod:`cnnvis_tb.probe_pass`), warn-once / ``strict``, and the flush after each logging step.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import logging
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from cnnvis_tb import tags
from cnnvis_tb.distributed import ShardedModel, is_logging_rank, sharding
from cnnvis_tb.events import use_fast_checksums
from cnnvis_tb.kinds import BUILTIN
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext, unknown_kind
from cnnvis_tb.layers import (
    LayerTrace,
    conv_layers,
    layer_table,
    resolve_layer,
    select_output,
    trace_layers,
    unwrap_model,
)
from cnnvis_tb.options import check_options
from cnnvis_tb.probe import check_channels
from cnnvis_tb.probe_pass import ProbePass, run_probe_pass
from cnnvis_tb.safety import model_device, model_dtype, preserved, rng_states, same_rng, single_threaded
from cnnvis_tb.schedule import due_kinds

__all__ = ["VisLogger"]

#: Progress of long logging work at INFO (silent unless the application configures logging, as the examples do).
log = logging.getLogger("cnnvis_tb")
#: A kind taking longer than this (seconds) at a logging step is reported at INFO.
SLOW_KIND_SECONDS = 1.0

_FAILED = object()


class VisLogger:
    """Log kernel grids, feature maps, Grad-CAM, activation maximization and histograms while a CNN trains.

    ``VisLogger(model, "runs/exp", probe=images)``, then ``vis.step(global_step)`` once per training step.
    Everything is computed on a fixed probe batch, with the model in eval mode, and leaves training exactly
    as it was (modes, parameters, gradients, optimizer, BatchNorm statistics, RNG, hooks).

    Distributed training: with ``DataParallel`` / ``DistributedDataParallel`` only global rank 0 logs, on the
    wrapped module, with no collective call (build the logger on every rank or on rank 0 alone). With FSDP
    (``fully_shard`` or ``FullyShardedDataParallel``) build it and call ``step`` on *every* rank: each logging step
    every rank joins one gather of the full parameters, and rank 0 logs on an unsharded copy of the model
    (see :mod:`cnnvis_tb.distributed` for why, and for the cost).

    Args:
        model: the network being trained (DataParallel / DDP / ``torch.compile`` wrappers are looked through;
            an FSDP model is gathered, see above).
        log_dir: folder for a new ``SummaryWriter`` (closed by :meth:`close`). Give this or ``writer``; ranks
            other than 0 of a process group never write and may give neither.
        writer: an existing ``SummaryWriter`` to write to (never closed by us).
        probe: the images to look at: ``[N, C, H, W]`` as the model sees them (normalized), or a Dataset /
            DataLoader from which the first ``probe_size`` samples (and their labels) are taken in index order.
        probe_labels: true class of each probe image ``[N]`` (for Grad-CAM of the true class).
        mean, std: the input normalization, to show probe images in their real colours and to optimize
            activation-maximization images in pixel space. Without them images are shown min-max scaled.
        class_names: names of the classes, drawn into the Grad-CAM pictures.
        layers: None (automatic), a list of ``named_modules()`` names used by every kind that takes layers,
            or a mapping ``{kind: [names]}`` for ``kernels``, ``features``, ``gradcam``, ``actmax`` and your kinds.
            Automatic: three convolutions spread over depth for kernels and features, the last convolutional
            block before global pooling for Grad-CAM, the middle and last of those convolutions for actmax.
        every: steps between logs: one int for all kinds or ``{kind: int}`` over the defaults
            (kernels/histograms 100, features/gradcam/saliency 200, actmax 1000). A kind is logged at the
            steps that are multiples of its interval, step 0 included, except activation maximization, which
            starts at its interval: on the random weights of step 0 it shows nothing learned, and it is the
            costliest kind (``log_now(0, kinds=["actmax"])`` logs it there if you want it).
        kinds: which kinds to log: built-in kind names and :class:`~cnnvis_tb.Kind` instances (a kind of your
            own), mixed; default ``("gradcam", "features", "kernels", "actmax", "histograms", "health")``;
            ``"saliency"`` is available too.
        saliency_methods: the saliency maps shown side by side: any of ``"vanilla"`` (input gradient, from the
            shared forward pass), ``"smoothgrad"`` (16 noisy copies per image: about 16 more forward and backward
            passes over the probe) and ``"guided"`` (guided backpropagation: one more pass; needs ReLUs).
        cam_methods: the CAM methods shown side by side by the ``gradcam`` kind, any of ``cam``, ``gradcam``,
            ``gradcam++``, ``xgradcam``, ``hirescam``, ``layercam``, ``eigencam``, ``eigengradcam``, ``scorecam``,
            ``ablationcam``, ``fullgrad`` (see :mod:`cnnvis_tb.kinds.cam_methods`). The gradient methods share the
            one forward and backward pass; Score-CAM and Ablation-CAM cost one perturbed image per channel of the
            layer, probe image and target (the constructor warns when that is large).
        cam_batch_size: perturbed images per forward pass of Score-CAM and Ablation-CAM (their memory cap).
        cam_scale: ``"image"`` (each map scaled to its own min and max) or ``"run"`` (one scale per probe image,
            method and target kept over the run, so a map that fades or spreads over training shows as such).
        cam_metrics: log explanation-quality scalars at each Grad-CAM step, under ``cnnvis/metrics/gradcam/...``:
            ``True`` (``"default"``): per layer, method and target the map's entropy, stability, agreement and
            confidence drop / increase, with ``probe_boxes`` / ``probe_masks`` the pointing game, the energy in
            the box and the IoU, and the deletion / insertion AUCs of the first method's map of the predicted
            class (above 64 x 64 pixels at every 4th Grad-CAM step: ``GradCam(deletion_every=...)``);
            ``"all"``: deletion / insertion for every method and target too; ``"cheap"``: only the
            metrics computed from the maps (none that runs the model again); ``False``: none. With
            ``async_logging`` the ones that run the model run on the worker, on a frozen copy of the model.
        probe_boxes: one object box per probe image ``[N, 4]`` as ``(x0, y0, x1, y1)`` in input pixels.
        probe_masks: one object mask per probe image ``[N, H, W]`` (bool, the input's size).
        strict: raise when a visual fails instead of warning once and going on (tests use it).
        probe_size: how many samples to take from a Dataset/DataLoader probe.
        top_k: feature channels shown per probe image (the most active ones).
        actmax_channels: channels per actmax layer (spread evenly over the layer's channels), or
            ``{layer: [channels]}``.
        actmax_steps: gradient-ascent steps per activation-maximization log.
        actmax_background: optimize on a frozen snapshot of the model in a worker thread, so the training
            loop is blocked only while the snapshot is taken; results are logged at the snapshot's step.
        actmax_diversity: activation-maximization images per channel (1: one), pushed apart by their Gram matrices.
        max_kernels: at most this many kernels per kernel grid.
        output_selector: picks the ``[N, classes]`` scores from a model that returns a tuple or dict.
        seed: seed of the logger's own random generator (activation maximization).
        graph: log the model's graph once, for TensorBoard's Graphs tab (``SummaryWriter.add_graph``), at the first
            logging step, traced on the first probe image in eval mode under the same guard as the visuals. A model
            whose trace depends on its input (data-dependent control flow) warns once and logs no graph.
        async_logging: at a logging step of :meth:`step`, the training thread runs only what needs the model (the
            shared probe pass and every kind's ``compute``: forwards, gradients, perturbation forwards, reads of
            the parameters) and hands the results, detached, to one worker thread that renders, PNG-encodes,
            writes and flushes (kinds with ``log_in_background``; a kind of yours without it logs on the
            training thread). The default. ``False``: everything on the training thread, as in earlier versions.
            :meth:`log_now` waits for its own step's work, :meth:`close` (and interpreter exit) for all of it.
            Under ``strict`` a failure on the worker raises at the next :meth:`step`, :meth:`log_now` or
            :meth:`close`.
        max_pending: logging steps whose rendering may still run on the worker when :meth:`step` returns; when
            the worker is that far behind, the next logging step waits for it (a killed run loses at most these).
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike | None = None,
        *,
        writer=None,
        probe,
        probe_labels: Sequence[int] | torch.Tensor | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        every: int | Mapping[str, int] | None = None,
        kinds: Iterable[str | Kind] | None = None,
        strict: bool = False,
        probe_size: int = 8,
        top_k: int = 8,
        actmax_channels: int | Mapping[str, Sequence[int]] = 8,
        actmax_steps: int = DEFAULT_STEPS,
        actmax_background: bool = False,
        actmax_diversity: int = 1,
        max_kernels: int = 64,
        output_selector: Callable[[object], torch.Tensor] | None = None,
        saliency_methods: str | Sequence[str] = "vanilla",
        cam_methods: str | Sequence[str] = ("gradcam", "gradcam++"),
        cam_batch_size: int = 64,
        cam_scale: str = "image",
        cam_metrics: bool | str = True,
        probe_boxes: Sequence[Sequence[float]] | torch.Tensor | None = None,
        probe_masks: torch.Tensor | None = None,
        seed: int = 0,
        graph: bool = False,
        async_logging: bool = True,
        max_pending: int = 1,
    ) -> None:
        self._net = unwrap_model(model)
        self._probe_cache: tuple[torch.device, torch.dtype, torch.Tensor] | None = None
        self._closed = True  # until the constructor has validated everything
        self._kinds: list[Kind] = []
        self._sharded: ShardedModel | None = None
        options = check_options(
            probe=probe, probe_labels=probe_labels, mean=mean, std=std, class_names=class_names, every=every,
            kinds=kinds, probe_size=probe_size, top_k=top_k, max_kernels=max_kernels, actmax_steps=actmax_steps,
            actmax_channels=actmax_channels, output_selector=output_selector, saliency_methods=saliency_methods,
            actmax_background=actmax_background, cam_methods=cam_methods, cam_batch_size=cam_batch_size,
            actmax_diversity=actmax_diversity,
            cam_scale=cam_scale, cam_metrics=cam_metrics, probe_boxes=probe_boxes, probe_masks=probe_masks,
            graph=graph, async_logging=async_logging, max_pending=max_pending,
        )
        self._async, self.max_pending = options.async_logging, options.max_pending
        self._graph_pending = options.graph  # logged at the first logging step
        if (probe_boxes is not None or probe_masks is not None) and not any(
                getattr(k, "metrics", False) for k in options.kinds):
            raise ValueError("probe_boxes / probe_masks are scored by the gradcam kind's metrics (pointing game, "
                             "energy in the box): add 'gradcam' to kinds and keep cam_metrics=True")
        if isinstance(cam_metrics, str) and not any(k.name == "gradcam" for k in options.kinds):
            raise ValueError(f"cam_metrics={cam_metrics!r} asks for the CAM metrics, which the gradcam kind logs, but "
                             "kinds does not include 'gradcam': add it, or leave cam_metrics out")
        self.strict = bool(strict)
        self.output_selector, self.seed = output_selector, seed
        if writer is not None and log_dir is not None:
            raise ValueError("give either log_dir or writer, not both")
        if writer is not None and getattr(writer, "all_writers", True) is None:
            raise ValueError("writer is already closed; pass an open SummaryWriter or a log_dir")
        if writer is None and log_dir is None and is_logging_rank():  # the other ranks never write
            raise ValueError("give log_dir (a folder such as 'runs/exp1') or writer (a SummaryWriter)")

        flavour = sharding(self._net)
        if flavour is not None:
            # Every rank joins the first gather; rank 0 then builds everything on its unsharded copy and tells the
            # others whether it could (so a bad layer name stops every rank, not rank 0 alone).
            self._sharded = ShardedModel(self._net, flavour)
            copied = self._sharded.gather()
            if not self._sharded.is_rank0:
                self._follow(options, writer, log_dir)
                return
            self._net = self._sharded.replica
            try:
                if copied is not None:
                    raise RuntimeError(f"copying the full parameters of the {flavour.upper()} model failed: "
                                       f"{type(copied).__name__}: {copied}") from copied
                self._setup(options, writer, log_dir, layers)
            except BaseException as e:
                self._sharded.agree(f"{type(e).__name__}: {e}", what="VisLogger(...)")
                raise
            self._sharded.agree(info={"num_classes": self.num_classes, "class_names": self.class_names,
                                      "layers": {k.name: list(k.layers) for k in self._kinds}})
            return
        self._setup(options, writer, log_dir, layers)

    def _follow(self, options, writer, log_dir) -> None:
        """The constructor on a rank other than 0 of a sharded model: no copy of the model, no writer; the schedule,
        and what rank 0 found (class count, layers), or rank 0's error."""
        self.probe, self.mean, self.std = options.probe, options.mean, options.std
        found = self._sharded.agree(what="VisLogger(...)")
        self.num_classes, self.class_names = found["num_classes"], found["class_names"]
        self._traces, self._info = [], None
        self._warned: set[tuple[str, str]] = set()
        self._warn_lock = threading.Lock()  # before the kinds' setup: it may warn
        self._lock = threading.RLock()
        self._kinds = options.kinds
        for kind in self._kinds:
            kind.layers = list(found["layers"].get(kind.name, []))
        self._start(writer, log_dir)

    def _setup(self, options, writer, log_dir, layers) -> None:
        """The constructor's checks against the model and the kinds' setup (on rank 0's copy of a sharded model)."""
        convs = conv_layers(self._net)
        if not convs:
            raise ValueError(
                f"{type(self._net).__name__} has no 2-D convolution (nn.Conv2d): cnnvis_tb visualizes "
                "convolutional networks; pass the CNN (or the part of your model that holds its convolutions)"
            )
        self.probe = options.probe
        check_channels(self.probe.images, convs[0][1].in_channels)
        self.mean, self.std = options.mean, options.std

        # One dry run on the probe: checks that the model accepts it, finds class count and layer shapes.
        self._traces, num_classes = self._dry_run()
        self.num_classes = num_classes
        if self.probe.labels is not None:
            bad = self.probe.labels[(self.probe.labels < 0) | (self.probe.labels >= num_classes)]
            if bad.numel():
                raise ValueError(
                    f"probe_labels hold classes {sorted(set(bad.tolist()))} out of range: the model outputs "
                    f"{num_classes} classes (valid labels are 0..{num_classes - 1})"
                )
        class_names = options.class_names
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but the model outputs {num_classes} classes")
        self.class_names = class_names

        self._warned: set[tuple[str, str]] = set()
        self._warn_lock = threading.Lock()  # before the kinds' setup: it may warn
        self._lock = threading.RLock()
        self._info = ModelInfo(
            net=self._net, traces=self._traces, probe=self.probe, num_classes=num_classes, mean=self.mean,
            std=self.std, class_names=class_names, output_selector=self.output_selector, seed=self.seed,
            strict=self.strict, warn_once=self._warn_once, guard=self._guarded, open_output=self._open_output,
            draws_random=self._draws_random,
        )
        _assign_layers(options.kinds, layers, self._info)
        for kind in options.kinds:
            kind.setup(self._info)
        self._kinds = options.kinds
        self._start(writer, log_dir)

    def _start(self, writer, log_dir) -> None:
        self.kinds = tuple(k.name for k in self._kinds)
        self.every = {k.name: k.every for k in self._kinds}
        self._owns_writer = writer is None
        self._forked_writer = False  # the user's writer, inherited from the parent by a forked process
        self._forked = False  # a forked process whose rank is not known yet (see _rank_after_fork)
        self._active = is_logging_rank()
        self._writer = writer
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        if self._active and self._log_dir is not None:
            self._check_writable(self._log_dir)
        if self._active:  # ranks that never write need not import TensorBoard's writer
            use_fast_checksums()
        self._closed = False
        self._stopped = False  # writing failed: nothing more is logged (training goes on)
        #: Held around every use of the writer (the writes and flushes of a logging step, on the training thread or
        #: the worker, and of background kinds, :meth:`_open_output`), never while a kind renders or while waiting
        #: for anything else: the kinds' writes are kept by their :class:`Output` and made at its flush.
        self._write_lock = threading.Lock()
        self._worker = _Worker(self.max_pending) if self._async and self._active else None
        if self._info is not None:  # None on the ranks of a sharded model that do not log
            self._info.in_background = self._worker is not None
        self._async_error: BaseException | None = None  # a strict failure on the worker, raised at the next call
        #: ``{kind: seconds}`` the worker spent rendering and writing each kind of the latest logging step it
        #: finished (asynchronous logging only; :attr:`last_times` is the training thread's share).
        self.last_worker_times: dict[str, float] = {}
        self.last_worker_step: int | None = None  #: the step of :attr:`last_worker_times`
        self._warned_closed = False
        self._table_logged = False
        self._last_logged: dict[str, int] = {}
        #: ``{kind: seconds}`` of the latest logging step, for the kinds it logged (progress bars show it): the time
        #: the training thread spent on each (with ``async_logging`` its ``compute``, and ``log`` of the kinds that
        #: log on the training thread; see :attr:`last_worker_times`).
        self.last_times: dict[str, float] = {}
        _open_loggers.add(self)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_writable(log_dir: str) -> None:
        if _URL.match(log_dir):
            _check_remote(log_dir)
            return
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"log_dir {log_dir!r} cannot be created ({e.strerror}); choose a writable folder") from e
        if not os.access(log_dir, os.W_OK | os.X_OK):
            raise ValueError(f"log_dir {log_dir!r} is not writable; choose a writable folder")

    def _dry_run(self) -> tuple[list[LayerTrace], int]:
        with preserved(self._net), torch.no_grad():
            x = self._probe_tensor()
            before = rng_states(self._net)
            lazy = any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in self._net.modules())
            try:
                traces, output = trace_layers(self._net, x)
                # (a lazy module draws its first weights now: the probe passes tell later whether the model does)
                self._draws_random = not lazy and not same_rng(before, rng_states(self._net))
            except Exception as e:  # the model's own error, rephrased with what we gave it
                raise ValueError(
                    f"the model could not run on the probe of shape {list(x.shape)}: {type(e).__name__}: {e}. "
                    "Give the probe exactly as the model sees it in training (size, channels, normalization)"
                ) from e
            scores = select_output(output, self.output_selector)
        if scores.shape[0] != x.shape[0]:
            raise ValueError(f"model returned {scores.shape[0]} score rows for {x.shape[0]} probe images")
        return traces, scores.shape[1]

    # ------------------------------------------------------------------ public API
    @property
    def writer(self):
        """The ``SummaryWriter`` (created on first use, on the logging rank only)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._log_dir)
        return self._writer

    @property
    def layers(self) -> dict[str, list[str]]:
        """``{kind: [layer names]}`` for the logged kinds that take layers, as chosen at construction."""
        return {k.name: list(k.layers) for k in self._kinds if k.layer_role is not None}

    def kind(self, name: str) -> Kind:
        """The logged kind called ``name`` (a built-in kind or one of yours)."""
        for kind in self._kinds:
            if kind.name == name:
                return kind
        raise self._not_logged(name)

    def _not_logged(self, name: object) -> ValueError:
        if name in BUILTIN:
            return ValueError(f"kind {name!r} is not logged by this VisLogger (kinds={list(self.kinds)}); "
                              f"add it to kinds=[...] when creating the VisLogger")
        return unknown_kind(name, list(self.kinds))

    def due(self, global_step: int) -> tuple[str, ...]:
        """The kinds whose interval divides ``global_step`` (at step 0: those logged at step 0)."""
        return tuple(k.name for k in due_kinds(self._kinds, global_step))

    def step(self, global_step: int) -> bool:
        """Log the kinds due at ``global_step``; returns whether anything was logged.

        Call it once per training step, anywhere in the loop (also between ``backward()`` and
        ``optimizer.step()``). When nothing is due it returns at once: no hook, no tensor operation.
        """
        if self._closed:
            if not self._warned_closed:
                self._warned_closed = True
                warnings.warn(f"cnnvis_tb: vis.step({global_step}) after vis.close(): nothing is logged any more; "
                              "close the VisLogger after the training loop (or use `with VisLogger(...) as vis:`)",
                              RuntimeWarning, stacklevel=2)
            return False
        if self._async_error is not None:
            self._raise_async_error()
        if self._forked:
            self._rank_after_fork()
        if self._sharded.stopped if self._sharded is not None else (not self._active or self._stopped):
            return False
        due = due_kinds(self._kinds, global_step, self._last_logged)
        if not due:
            return False
        return self._log_now(global_step, [k.name for k in due], wait=False)

    def log_now(self, global_step: int, kinds: Iterable[str] | str | None = None) -> bool:
        """Log ``kinds`` (names of logged kinds; default: all of them) at ``global_step`` now, whatever the
        schedule says.

        A failing kind warns once (or raises with ``strict=True``) and the others still log; the events of
        this step are flushed to disk before returning (with ``async_logging`` too: it waits for the worker).
        A kind's own cadence inside its schedule still holds: at a ``global_step`` its schedule would log anyway,
        Grad-CAM's deletion / insertion run only where ``GradCam(deletion_every=...)`` says (every 4th logging
        step above 64 × 64 px); off the schedule they always run.
        """
        return self._log_now(global_step, kinds, wait=True)

    def _log_now(self, global_step: int, kinds: Iterable[str] | str | None, wait: bool) -> bool:
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        if self._closed:
            raise RuntimeError("this VisLogger is closed")
        if self._async_error is not None:
            self._raise_async_error()
        if kinds is None:
            chosen = list(self._kinds)
        else:
            names = [kinds] if isinstance(kinds, str) else list(kinds)
            for name in names:
                if name not in self.kinds:
                    raise self._not_logged(name)
            chosen = [k for k in self._kinds if k.name in names]
        if self._sharded is not None:
            return self._log_sharded(global_step, chosen, wait)
        if self._forked:
            self._rank_after_fork()
        if not self._active or self._stopped:
            return False
        return self._log_and_flush(global_step, chosen, wait)

    def _rank_after_fork(self) -> None:
        """In a forked process the rank is known once its process group exists (DDP's ranks are forked before):
        only rank 0 logs, as in the process that made the logger."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._active, self._forked = self._active and is_logging_rank(), False

    def _log_and_flush(self, global_step: int, chosen: list[Kind], wait: bool = True) -> bool:
        if self._forked_writer:
            self._warn_once("forked-writer", "this VisLogger was given a SummaryWriter before the process forked, "
                            "and that writer cannot write from this process: nothing is logged here. Create the "
                            "writer (or the VisLogger) in this process")
            return False
        with self._lock:
            if self._worker is not None:
                # Bounded: with max_pending steps still on the worker, this step waits for the oldest (before its
                # own compute, so a kind's compute and the previous step's log of it never overlap).
                self._worker.wait_for_slot()
                if self._async_error is not None:
                    self._raise_async_error()
                if self._stopped:
                    return False
            self.last_times = {}
            later: list[tuple[Kind, object]] = []  # (kind, what its compute returned) for the worker
            ctx: list[StepContext] = []
            wrote = True  # unless _log says otherwise (it may raise under strict after writing)
            try:
                wrote = self._log(global_step, chosen, later, ctx)
            finally:
                for kind in chosen:
                    self._last_logged[kind.name] = global_step
                if self._writer is not None and not self._stopped and (self._worker is None or wrote):
                    with self._write_lock:
                        try:
                            self._writer.flush()
                        except Exception as e:
                            self._write_failed(e)
                if later and not self._stopped:  # also when a kind raised under strict: the others still log
                    job = functools.partial(self._log_later, _detached(ctx[0]), later)
                    # The step's own context (the probe pass's tensors and autograd graph) is freed before the
                    # worker wakes: freeing it can let go of the GIL, and a busy worker then keeps it for the
                    # interpreter's switch interval (5 ms) while this thread waits to return to training.
                    ctx.clear()
                    self._worker.submit(job)
            if wait and self._worker is not None:
                self._worker.wait()
                if self._async_error is not None:
                    self._raise_async_error()
        return not self._stopped

    def _log_later(self, ctx: StepContext, later: list[tuple[Kind, object]]) -> None:
        """On the worker: each kind's ``log`` of one logging step (rendering, encoding, writing), then the flush. A
        failure warns once (as on the training thread); under ``strict`` it is kept and raised at the next call."""
        times: dict[str, float] = {}
        try:
            with single_threaded():  # the write lock is taken for the writes alone (Output.flush)
                try:
                    for kind, computed in later:
                        if self._stopped:
                            break
                        start = time.perf_counter()
                        self._guarded(kind.name, ctx.step, lambda k=kind, c=computed: self._written(k, ctx, c))
                        seconds = times[kind.name] = time.perf_counter() - start
                        if seconds >= SLOW_KIND_SECONDS:
                            log.info("step %d: %s took %.1f s to render and write", ctx.step, kind.name, seconds)
                finally:
                    if not self._stopped:
                        try:
                            with self._write_lock:
                                self._writer.flush()
                        except Exception as e:
                            self._write_failed(e)
        except Exception as e:  # strict (warned and swallowed otherwise)
            if self._async_error is None:
                self._async_error = e
        finally:
            self.last_worker_times = times
            self.last_worker_step = ctx.step

    def _raise_async_error(self) -> None:
        error, self._async_error = self._async_error, None
        raise error

    def wait(self) -> None:
        """Wait until the worker has written and flushed every logging step handed to it (asynchronous logging),
        and background activation maximization / DeepDream their pictures. Under ``strict`` a failure there raises
        here."""
        if self._worker is not None:
            self._worker.wait()
        if self._async_error is not None:
            self._raise_async_error()
        for kind in self._kinds:
            kind.wait_for_background()

    def _log_sharded(self, step: int, chosen: list[Kind], wait: bool = True) -> bool:
        """One logging step of a sharded model, on every rank: the gather (a collective), rank 0's logging on its
        copy (no collective), rank 0's outcome on every rank (a collective). See :mod:`cnnvis_tb.distributed`."""
        sharded = self._sharded
        if sharded.stopped:
            return False
        with self._lock:
            copied = sharded.gather()
            failure: BaseException | None = None
            logged = False
            if self._active and not self._stopped:
                try:
                    if copied is not None:  # nothing to look at: warned once (raised under strict) like a visual
                        self._guarded("model copy", step, lambda: _reraise(copied))
                    else:
                        logged = self._log_and_flush(step, chosen, wait)
                except BaseException as e:
                    failure = e
            for kind in chosen:
                self._last_logged[kind.name] = step
            try:
                sharded.agree(None if failure is None else f"{type(failure).__name__}: {failure}",
                              stopped=self._stopped, what=f"logging step {step}")
            except BaseException as e:
                if failure is not None:  # rank 0's own error is what counts
                    raise failure from e
                raise
            if failure is not None:
                raise failure
        return logged

    def close(self) -> None:
        """Wait for background work, flush, and close the writer if we created it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        failure: Exception | None = None
        try:
            worker = getattr(self, "_worker", None)
            if worker is not None:
                with contextlib.suppress(Exception):
                    worker.stop()  # after the logging steps handed to it are written
            for kind in self._kinds:
                try:
                    kind.close()
                except Exception as e:  # under strict, background work of the kind's own that failed
                    if self.strict and failure is None:
                        failure = e
        finally:
            _open_loggers.discard(self)
            if self._writer is not None and not self._forked_writer:
                try:  # never raises: a failed write was warned about (or raised, under strict) at its step
                    with self._write_lock:
                        if self._owns_writer:
                            self._writer.close()
                        elif getattr(self._writer, "all_writers", None) is not None:
                            self._writer.flush()
                except Exception as e:
                    if not self._stopped:
                        self._stopped = True
                        warnings.warn(f"cnnvis_tb: closing the event writer of {self._where()} failed "
                                      f"({type(e).__name__}: {e}); events written before stay readable",
                                      RuntimeWarning, stacklevel=2)
        if getattr(self, "_async_error", None) is not None:  # strict: a failure on the worker since the last call
            self._raise_async_error()
        if failure is not None:
            raise failure

    def __enter__(self) -> VisLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the block's own exception is the one to see; a strict failure of ours would replace it
            self.close()
        except Exception as e:
            log.warning("closing the VisLogger after %s also failed: %s: %s", exc_type.__name__, type(e).__name__, e)

    # ------------------------------------------------------------------ logging step
    def _probe_tensor(self) -> torch.Tensor:
        """The probe on the model's current device and dtype (cached; the model may move after construction)."""
        device, dtype = model_device(self._net), model_dtype(self._net)
        cache = self._probe_cache
        if cache is None or cache[0] != device or cache[1] != dtype:
            self._probe_cache = cache = (device, dtype, self.probe.images.to(device=device, dtype=dtype))
        return cache[2]

    def _where(self) -> str:
        return repr(self._log_dir if self._log_dir is not None else getattr(self._writer, "log_dir", "the writer"))

    def _write_failed(self, error: BaseException) -> None:
        """Writing the events failed (disk full, file-size limit, folder gone, the writer's thread dead): warn once
        and stop logging, so training goes on and no later step fails again; raise under strict. Warned once, also
        when the worker or a background kind's thread fails to write at the same time."""
        with self._warn_lock:
            first, self._stopped = not self._stopped, True
        if self.strict:
            raise error
        if not first:
            return
        warnings.warn(f"cnnvis_tb: writing to {self._where()} failed ({type(error).__name__}: {error}); the logger "
                      "stops writing and training continues. Events written before stay readable; free space or "
                      "fix the folder and create a new VisLogger to log again.", RuntimeWarning, stacklevel=4)

    def _guarded(self, what: str, step: int, fn: Callable[[], object], failed: object = None) -> object:
        """Run one visual; on failure warn once per (what, error type) and go on (returning ``failed``), or
        raise when strict. An ``OSError`` is taken for a failed write (see :meth:`_write_failed`)."""
        try:
            return fn()
        except OSError as e:
            self._write_failed(e)
            return failed
        except Exception as e:
            if self.strict:
                raise
            key = (what, type(e).__name__)
            with self._warn_lock:
                first = key not in self._warned
                self._warned.add(key)
            if first:
                warnings.warn(
                    f"cnnvis_tb: the {what} visual failed at step {step} and is skipped "
                    f"({type(e).__name__}: {e}); training continues. Pass strict=True to raise instead.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return failed

    def _warn_once(self, key: str, message: str) -> None:
        with self._warn_lock:
            first = ("note", key) not in self._warned
            self._warned.add(("note", key))
        if first:
            warnings.warn(f"cnnvis_tb: {message}", RuntimeWarning, stacklevel=5)

    def _log(self, step: int, kinds: list[Kind], later: list[tuple[Kind, object]],
             context: list[StepContext]) -> bool:
        """One logging step on the training thread: the tables, the shared pass and every kind's ``compute``, then
        its ``log``, or, with asynchronous logging and a kind that allows it, ``(kind, computed)`` appended to
        ``later`` for the worker (the step's context appended to ``context``). Returns whether it wrote."""
        wrote = False
        with preserved(self._net):
            if not self._table_logged or self._graph_pending:
                self.writer  # noqa: B018  (created here, on the training thread)
                with self._write_lock:
                    wrote = True
                    if not self._table_logged:
                        self._guarded("summary", step, lambda: self._log_tables(step))
                        self._table_logged = True
                    if self._graph_pending:
                        self._graph_pending = False
                        self._guarded("graph", step,
                                      lambda: _add_graph(self.writer, self._net, self._probe_tensor()[:1]))
            needs = functools.reduce(lambda a, b: a | b, (k.needs() for k in kinds), Needs())
            shared = None
            if needs.forward:
                shared = self._guarded("probe", step, lambda: self._probe_pass(needs))
            ctx = StepContext(step=step, info=self._info, inputs=self._probe_tensor(), shared=shared)
            context.append(ctx)
            for kind in kinds:
                if self._stopped:
                    return wrote
                if shared is None and kind.needs().forward:  # the shared pass failed, and said so
                    continue
                # Network work with every thread; the rest renders small pictures, on one.
                start = time.perf_counter()
                computed = self._guarded(kind.name, step, lambda k=kind: k.compute(ctx), failed=_FAILED)
                if computed is not _FAILED:
                    if self._worker is not None and kind.log_in_background:
                        self.writer  # noqa: B018  (created on the training thread, used on the worker)
                        later.append((kind, computed))
                    else:
                        wrote = True
                        with single_threaded():
                            self._guarded(kind.name, step, lambda k=kind, c=computed: self._written(k, ctx, c))
                seconds = self.last_times[kind.name] = time.perf_counter() - start
                if seconds >= SLOW_KIND_SECONDS:
                    log.info("step %d: %s took %.1f s", step, kind.name, seconds)
        return wrote

    def _probe_pass(self, needs: Needs) -> ProbePass:
        info = self._info
        before = rng_states(self._net) if info is not None and not info.draws_random else None
        record = run_probe_pass(self._net, self._probe_tensor(), needs, self.probe.labels, self.output_selector)
        if before is not None and not same_rng(before, rng_states(self._net)):
            info.draws_random = True  # (restored by preserved(), as always; from now on no copy elsewhere)
        if not torch.isfinite(record.scores.detach()).all():
            self._warn_once("nonfinite-scores", "the model's outputs on the probe hold NaN or inf values")
        return record

    def _written(self, kind: Kind, ctx: StepContext, computed: object) -> None:
        """Run one kind's logging; what it added (pictures encoded meanwhile on a helper thread) is written
        before it counts as done, also what it made before a failure, under the write lock (held for the writes
        alone, so the training thread and the worker render side by side)."""
        out = Output(kind.name, self.writer, ctx.step, self._write_lock)
        try:
            kind.log(ctx, out, computed)
        finally:
            out.flush()

    @contextlib.contextmanager
    def _open_output(self, kind: Kind, step: int) -> Iterator[Output]:
        """An :class:`Output` for work a kind finishes later on a thread of its own: written on exit under the
        writer's lock (so never at the same time as a logging step's writes, on the training thread or the worker)
        and flushed to disk."""
        out = Output(kind.name, self.writer, step, self._write_lock)
        try:
            yield out
        finally:
            if not self._stopped:  # a failed write stopped logging: nothing more is written
                try:
                    out.flush()
                    with self._write_lock:
                        self.writer.flush()
                except OSError as e:  # as at a logging step: warned once, logging stops (raised under strict)
                    self._write_failed(e)

    def _log_tables(self, step: int) -> None:
        """The layer table and the kinds table (label and order of every kind for the tab), once per run."""
        self.writer.add_text(tags.text_tag("model", "layers"), layer_table(self._net, traces=self._traces), step)
        rows = [(k.name, k.label or k.name, k.details()) for k in self._kinds]
        self.writer.add_text(tags.KINDS_TABLE_TAG, tags.kinds_table(rows), step)


def _add_graph(writer, net: nn.Module, inputs: torch.Tensor) -> None:
    """Write ``net``'s graph, traced on ``inputs`` by ``SummaryWriter.add_graph``, for TensorBoard's Graphs tab.

    Runs under :func:`~cnnvis_tb.safety.preserved` (eval mode; flags and RNG put back) and registers no hook. A trace
    records the ops of one input: when the tracer warns that they may differ for another input (data-dependent
    control flow such as ``if x.sum() > 0``), it is refused before anything is written, so no wrong graph is shown.
    The tracer's own warnings (and its deprecation notice) are not passed on: the error says what went wrong.
    """
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            torch.jit.trace(net, inputs, check_trace=False, strict=False)
        except Exception as e:
            raise RuntimeError(f"the model could not be traced for the Graphs tab ({type(e).__name__}: {e}); pass "
                               "graph=False to leave the graph out") from e
        tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        if tracer:
            raise RuntimeError(f"the model's graph depends on its input, so none is logged (torch.jit.trace: "
                               f"{tracer[0].message}). Data-dependent control flow such as `if x.sum() > 0` cannot "
                               "be traced; pass graph=False to leave the graph out")
        writer.add_graph(net, inputs, use_strict_trace=False)


def _reraise(error: BaseException) -> None:
    raise error


def _detached(ctx: StepContext) -> StepContext:
    """The context a kind's ``log`` gets on the worker: the same step, model info and probe, and the shared pass
    without its autograd graph (every tensor detached; they are the pass's own outputs, which no training step
    writes into). Kinds copy in ``compute`` what the training loop may change in place (parameters, gradients)."""
    shared = ctx.shared
    if shared is not None:
        def d(t):
            return t.detach() if isinstance(t, torch.Tensor) else t

        shared = ProbePass(
            scores=d(shared.scores), inputs=d(shared.inputs), targets={k: d(v) for k, v in shared.targets.items()},
            activations={k: d(v) for k, v in shared.activations.items()},
            graph_activations={k: d(v) for k, v in shared.graph_activations.items()},
            own_activations={k: d(v) for k, v in shared.own_activations.items()},
            grads={key: {k: d(v) for k, v in grads.items()} for key, grads in shared.grads.items()})
    return StepContext(step=ctx.step, info=ctx.info, inputs=ctx.inputs.detach(), shared=shared, _shown=ctx._shown)


class _Worker:
    """The one background thread of asynchronous logging: runs the logging steps handed to it (their rendering,
    encoding and writing) one after the other, in order. At most ``max_pending`` are in flight (handed over and not
    finished): :meth:`submit` waits for the oldest to finish when there are that many."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        #: How many times :meth:`submit` had to wait for the worker (it was ``max_pending`` steps behind).
        self.waits = 0
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._pending = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _check_fork(self) -> None:
        """A forked child has none of its parent's threads: its copy of the queue would wait forever."""
        if os.getpid() != self._pid:
            self._reset()

    @property
    def pending(self) -> int:
        """Logging steps handed over and not finished."""
        return self._pending

    def wait_for_slot(self) -> None:
        """Until fewer than ``max_pending`` jobs are in flight (counted in :attr:`waits` when it had to wait)."""
        self._check_fork()
        with self._cond:
            if self._pending >= self.max_pending:
                self.waits += 1
                while self._pending >= self.max_pending:
                    self._cond.wait()

    def submit(self, job: Callable[[], None]) -> None:
        """Hand ``job`` over; waits first for a slot (the logger waited already, see :meth:`wait_for_slot`)."""
        self.wait_for_slot()
        with self._cond:
            self._pending += 1
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cnnvis-log", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait(self) -> None:
        """Until every job handed over has finished."""
        self._check_fork()
        with self._cond:
            while self._pending:
                self._cond.wait()

    def stop(self) -> None:
        """Wait for the jobs, then end the thread."""
        self.wait()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except BaseException:  # the job reports its own failures; this is a bug of ours, never the run's end
                log.exception("cnnvis_tb: the logging worker failed")
            finally:
                del job
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()


#: A log dir naming a store rather than a local folder: ``s3://``, ``gs://`` or any fsspec protocol.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: The package that gives TensorBoard's file layer each store (s3:// goes through boto3, the others through fsspec).
_STORE_PACKAGES = {"s3": "boto3", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hdfs": "pyarrow",
                   "http": "aiohttp", "https": "aiohttp"}


def _check_remote(log_dir: str) -> None:
    """A remote log dir, checked the remote way: the store's package is installed and the location can be listed
    (bucket and endpoint exist, credentials are accepted). No local folder is made."""
    scheme = log_dir.split("://", 1)[0].lower()
    package = _STORE_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
    try:
        from tensorboard.compat.tensorflow_stub.io import gfile

        gfile.exists(log_dir)
    except ImportError as e:
        raise ValueError(f"log_dir {log_dir!r} needs {package} to write {scheme}:// through TensorBoard's file layer: "
                         f"pip install {package.split()[0] if scheme in _STORE_PACKAGES else 'fsspec'} ({e})") from e
    except Exception as e:
        hint = " (S3_ENDPOINT, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION)" if scheme == "s3" else ""
        raise ValueError(f"log_dir {log_dir!r} cannot be reached ({type(e).__name__}: {e}); check the bucket name, "
                         f"the endpoint and the credentials{hint}") from e


def _assign_layers(kinds: list[Kind], layers, info: ModelInfo) -> None:
    """Hand ``VisLogger(layers=...)`` to the kinds: a mapping names each kind's layers, a plain list the layers of
    every kind that follows it (kernel grids take the convolutions among them; Grad-CAM keeps its own)."""
    if layers is None:
        return
    if isinstance(layers, Mapping):
        takes = {k.name for k in kinds if k.layer_role is not None}
        takes |= {name for name, cls in BUILTIN.items() if cls.layer_role is not None}
        for name in layers:
            if name not in takes:
                raise ValueError(f"layers has unknown kind {name!r}; layers can be given for {tuple(sorted(takes))}")
        enabled = {k.name: k for k in kinds}
        for name, given in layers.items():
            given = [given] if isinstance(given, (str, nn.Module)) else list(given)
            if name in enabled:
                enabled[name]._given_layers = given
            else:  # a kind not logged: its layers are still checked, so a typo shows now, not when it is enabled
                for layer in given:
                    resolve_layer(info.net, layer)
        return
    names = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    for layer in names:  # every name must exist, whichever kinds take it
        resolve_layer(info.net, layer)
    for kind in kinds:
        picked = kind.layers_from_list(info, names)
        if picked is not None and kind._given_layers is None:
            kind._given_layers = picked


# Loggers still open at interpreter exit are closed, so queued events reach the disk.
_open_loggers: weakref.WeakSet[VisLogger] = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:
    for vis in list(_open_loggers):
        with contextlib.suppress(Exception):
            vis.close()


def _drain_open_loggers() -> None:
    """At the end of the main thread, before ``concurrent.futures`` stops its pools (the PNG encoders): the logging
    steps still queued for the workers are written. (Threading's exit hooks run in reverse order of registration,
    and the pools' hook was registered when :mod:`cnnvis_tb.events` was imported, before this one.)"""
    for vis in list(_open_loggers):
        worker = getattr(vis, "_worker", None)
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.wait()
        for kind in getattr(vis, "_kinds", ()):  # background activation maximization / DeepDream
            try:
                kind.wait_for_background()
            except Exception as e:  # strict: kept for the next step() or close() of a thread that goes on
                if getattr(vis, "_async_error", None) is None:
                    vis._async_error = e


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_drain_open_loggers)


def _after_fork_in_child() -> None:
    """A forked process (DDP or Lightning with the fork start method, ``os.fork``) has none of its parent's threads:
    a lock one of them held stays locked, and the parent's ``SummaryWriter`` waits for a writer thread that does
    not exist (its first flush would hang). Each open logger gets new locks, and a writer it made itself is left to
    the parent: the child opens an event file of its own at its first write. A writer the user gave cannot be
    reopened: that logger writes nothing in the child (it says so once)."""
    for vis in list(_open_loggers):
        vis._forked = True
        vis._warn_lock = threading.Lock()
        vis._lock = threading.RLock()
        if hasattr(vis, "_write_lock"):
            vis._write_lock = threading.Lock()
        if getattr(vis, "_writer", None) is not None:
            if vis._owns_writer:
                vis._writer = None
            else:
                vis._forked_writer = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
