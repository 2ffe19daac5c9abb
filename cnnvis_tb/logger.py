"""``VisLogger``: two lines in a training loop log what the CNN learns, on a schedule, on a fixed probe batch."""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.events import PictureWriter, use_fast_checksums
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS, ActMaxConfig, optimize_channels
from cnnvis_tb.kinds.features import feature_panels
from cnnvis_tb.kinds.gradcam import cam_from_gradients, normalize_maps
from cnnvis_tb.kinds.histograms import log_histograms
from cnnvis_tb.kinds.kernels import render_kernels
from cnnvis_tb.kinds.saliency import check_guided, input_gradients, saliency_from_gradients
from cnnvis_tb.layers import (
    LayerTrace,
    conv_layers,
    default_cam_layer,
    find_layers,
    layer_table,
    resolve_layer,
    select_output,
    trace_layers,
    unwrap_model,
)
from cnnvis_tb.options import check_options
from cnnvis_tb.probe import Probe, check_channels
from cnnvis_tb.render import as_rgb, caption, colorize, denormalize, fit, make_grid, overlay_heatmap, to_uint8
from cnnvis_tb.safety import capture, model_device, model_dtype, preserved, single_threaded
from cnnvis_tb.schedule import NOT_AT_STEP_ZERO, check_kinds

__all__ = ["VisLogger"]

#: Layer roles: which layers each kind looks at.
_LAYER_KINDS = ("kernels", "features", "gradcam", "actmax")
#: Kinds computed from the one shared forward pass over the probe.
_PROBE_KINDS = ("features", "gradcam", "saliency")


def _is_logging_rank() -> bool:
    """Only rank 0 of an initialized process group writes (every rank would otherwise write its own files)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _lookup(net: nn.Module, names: Iterable[str], missing_ok: bool = False) -> dict[str, nn.Module]:
    """``{name: module}`` for layers chosen at construction; a clear error if the model has changed since
    (or, with ``missing_ok``, only the layers still there: the shared forward pass serves the kinds that can go on)."""
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing and not missing_ok:
        raise LookupError(
            f"layers {missing} are no longer in the model (removed or renamed after VisLogger was created); "
            "create a new VisLogger for the changed model"
        )
    return {n: modules[n] for n in names if n in modules}


@dataclass
class _ProbePass:
    """One forward pass over the probe, shared by every kind that needs it at a logging step."""

    scores: torch.Tensor  # [N, classes], in the graph when gradients are needed
    inputs: torch.Tensor  # the probe as fed (requires grad for saliency)
    cam_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # in the graph
    feature_acts: dict[str, torch.Tensor] = field(default_factory=dict)  # detached copies
    grads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # target -> layer/"input" -> grad
    saliency_grads: dict[str, torch.Tensor] | None = None  # saliency method -> input gradients


class VisLogger:
    """Log kernel grids, feature maps, Grad-CAM, activation maximization and histograms while a CNN trains.

    ``VisLogger(model, "runs/exp", probe=images)``, then ``vis.step(global_step)`` once per training step.
    Everything is computed on a fixed probe batch, with the model in eval mode, and leaves training exactly
    as it was (modes, parameters, gradients, optimizer, BatchNorm statistics, RNG, hooks).

    Args:
        model: the network being trained (DataParallel / DDP / ``torch.compile`` wrappers are looked through).
        log_dir: folder for a new ``SummaryWriter`` (closed by :meth:`close`). Give this or ``writer``.
        writer: an existing ``SummaryWriter`` to write to (never closed by us).
        probe: the images to look at: ``[N, C, H, W]`` as the model sees them (normalized), or a Dataset /
            DataLoader from which the first ``probe_size`` samples (and their labels) are taken in index order.
        probe_labels: true class of each probe image ``[N]`` (for Grad-CAM of the true class).
        mean, std: the input normalization, to show probe images in their real colours and to optimize
            activation-maximization images in pixel space. Without them images are shown min-max scaled.
        class_names: names of the classes, drawn into the Grad-CAM pictures.
        layers: None (automatic), a list of ``named_modules()`` names used by every kind that takes layers,
            or a mapping ``{kind: [names]}`` for ``kernels``, ``features``, ``gradcam``, ``actmax``.
            Automatic: three convolutions spread over depth for kernels and features, the last convolutional
            block before global pooling for Grad-CAM, the middle and last of those convolutions for actmax.
        every: steps between logs: one int for all kinds or ``{kind: int}`` over the defaults
            (kernels/histograms 100, features/gradcam/saliency 200, actmax 1000). A kind is logged at the
            steps that are multiples of its interval, step 0 included, except activation maximization, which
            starts at its interval: on the random weights of step 0 it shows nothing learned, and it is the
            costliest kind (``log_now(0, kinds=["actmax"])`` logs it there if you want it).
        kinds: which kinds to log; default ``("kernels", "features", "gradcam", "actmax", "histograms")``;
            ``"saliency"`` is available too.
        saliency_methods: the saliency maps shown side by side: any of ``"vanilla"`` (input gradient, from the
            shared forward pass), ``"smoothgrad"`` (16 noisy copies per image: about 16 more forward and backward
            passes over the probe) and ``"guided"`` (guided backpropagation: one more pass; needs ReLUs).
        strict: raise when a visual fails instead of warning once and going on (tests use it).
        probe_size: how many samples to take from a Dataset/DataLoader probe.
        top_k: feature channels shown per probe image (the most active ones).
        actmax_channels: channels per actmax layer (spread evenly over the layer's channels), or
            ``{layer: [channels]}``.
        actmax_steps: gradient-ascent steps per activation-maximization log.
        actmax_background: optimize on a frozen snapshot of the model in a worker thread, so the training
            loop is blocked only while the snapshot is taken; results are logged at the snapshot's step.
        max_kernels: at most this many kernels per kernel grid.
        output_selector: picks the ``[N, classes]`` scores from a model that returns a tuple or dict.
        seed: seed of the logger's own random generator (activation maximization).
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
        kinds: Iterable[str] | None = None,
        strict: bool = False,
        probe_size: int = 8,
        top_k: int = 8,
        actmax_channels: int | Mapping[str, Sequence[int]] = 8,
        actmax_steps: int = DEFAULT_STEPS,
        actmax_background: bool = False,
        max_kernels: int = 64,
        output_selector: Callable[[object], torch.Tensor] | None = None,
        saliency_methods: str | Sequence[str] = "vanilla",
        seed: int = 0,
    ) -> None:
        self._net = unwrap_model(model)
        self._probe_cache: tuple[torch.device, torch.dtype, torch.Tensor] | None = None
        self._closed = True  # until the constructor has validated everything
        options = check_options(
            probe=probe, probe_labels=probe_labels, mean=mean, std=std, class_names=class_names, every=every,
            kinds=kinds, probe_size=probe_size, top_k=top_k, max_kernels=max_kernels, actmax_steps=actmax_steps,
            actmax_channels=actmax_channels, output_selector=output_selector, saliency_methods=saliency_methods,
        )
        self.strict = bool(strict)
        self.kinds, self._schedule = options.kinds, options.schedule
        self._schedule_at_zero = tuple((k, n) for k, n in self._schedule if k not in NOT_AT_STEP_ZERO)
        self.every = dict(self._schedule)
        self.top_k, self.max_kernels, self.output_selector = top_k, max_kernels, output_selector
        self._actmax_config = ActMaxConfig(steps=actmax_steps, seed=seed)
        self.saliency_methods, self.seed = options.saliency_methods, seed
        self.actmax_background = bool(actmax_background)

        convs = conv_layers(self._net)
        if not convs:
            raise ValueError(
                f"{type(self._net).__name__} has no 2-D convolution (nn.Conv2d): cnnvis_tb visualizes "
                "convolutional networks; pass the CNN (or the part of your model that holds its convolutions)"
            )
        self.probe: Probe = options.probe
        check_channels(self.probe.images, convs[0][1].in_channels)
        self.mean, self.std = options.mean, options.std

        # One dry run on the probe: checks that the model accepts it, finds class count and layer shapes.
        self._traces, num_classes = self._dry_run()
        self.num_classes = num_classes
        if self.probe.labels is not None:
            bad = self.probe.labels[(self.probe.labels < 0) | (self.probe.labels >= num_classes)]
            if bad.numel():
                raise ValueError(
                    f"probe_labels hold classes {bad.tolist()} out of range: the model outputs {num_classes} classes "
                    f"(valid labels are 0..{num_classes - 1})"
                )
        class_names = options.class_names
        if class_names is not None:
            if len(class_names) != num_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} names but the model outputs {num_classes} classes"
                )
        self.class_names = class_names
        if "guided" in self.saliency_methods:
            with preserved(self._net), torch.no_grad():
                check_guided(self._net, self._probe_tensor()[:1], self.output_selector)
        self.layers = self._choose_layers(layers)
        self._actmax_targets = self._choose_actmax_channels(actmax_channels)

        self._owns_writer = writer is None
        if writer is not None and log_dir is not None:
            raise ValueError("give either log_dir or writer, not both")
        if writer is not None and getattr(writer, "all_writers", True) is None:
            raise ValueError("writer is already closed; pass an open SummaryWriter or a log_dir")
        if writer is None and log_dir is None:
            raise ValueError("give log_dir (a folder such as 'runs/exp1') or writer (a SummaryWriter)")
        self._active = _is_logging_rank()
        self._writer = writer
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        if self._active and self._log_dir is not None:
            self._check_writable(self._log_dir)

        if self._active:  # ranks that never write need not import TensorBoard's writer
            use_fast_checksums()
        self._closed = False
        self._warned: set[tuple[str, str]] = set()
        self._table_logged = False
        self._notes_logged: set[str] = set()
        self._last_logged: dict[str, int] = {}
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._pending: list[Future] = []
        self._pictures: PictureWriter | None = None
        _open_loggers.add(self)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_writable(log_dir: str) -> None:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"log_dir {log_dir!r} cannot be created ({e.strerror}); choose a writable folder") from e
        if not os.access(log_dir, os.W_OK | os.X_OK):
            raise ValueError(f"log_dir {log_dir!r} is not writable; choose a writable folder")

    def _dry_run(self) -> tuple[list[LayerTrace], int]:
        with preserved(self._net), torch.no_grad():
            x = self._probe_tensor()
            try:
                traces, output = trace_layers(self._net, x)
            except Exception as e:  # the model's own error, rephrased with what we gave it
                raise ValueError(
                    f"the model could not run on the probe of shape {list(x.shape)}: {type(e).__name__}: {e}. "
                    "Give the probe exactly as the model sees it in training (size, channels, normalization)"
                ) from e
            scores = select_output(output, self.output_selector)
        if scores.shape[0] != x.shape[0]:
            raise ValueError(f"model returned {scores.shape[0]} score rows for {x.shape[0]} probe images")
        return traces, scores.shape[1]

    def _choose_layers(self, layers) -> dict[str, list[str]]:
        if layers is None or isinstance(layers, Mapping):
            given = dict(layers or {})
            for kind in given:
                if kind not in _LAYER_KINDS:
                    raise ValueError(f"layers has unknown kind {kind!r}; layers can be given for {_LAYER_KINDS}")
        else:
            # A plain list names the layers to look inside (features, actmax); kernel grids take the
            # convolutions among them, and Grad-CAM keeps its automatic class-discriminative layer.
            names = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
            given = {"features": names, "actmax": names}
            convs = [n for n in names if isinstance(n, str) and n in dict(conv_layers(self._net))]
            if convs:
                given["kernels"] = convs
        spread = find_layers(self._net, 3)
        defaults = {
            "kernels": spread,
            "features": spread,
            "gradcam": [default_cam_layer(self._traces)],
            "actmax": spread[-2:] if len(spread) > 1 else spread,
        }
        chosen = {}
        for kind in _LAYER_KINDS:
            names = given.get(kind, defaults[kind])
            if isinstance(names, (str, nn.Module)):
                names = [names]
            resolved = [resolve_layer(self._net, n, need_conv=kind == "kernels")[0] for n in names]
            if not resolved:
                raise ValueError(f"layers[{kind!r}] is empty; name at least one layer or leave it out")
            ran = {t.name for t in self._traces if t.order >= 0}
            silent = [n for n in resolved if n not in ran and kind != "kernels"]
            if silent:
                raise ValueError(f"layers {silent} for {kind} did not run in the model's forward pass on the probe")
            chosen[kind] = list(dict.fromkeys(resolved))
        return chosen

    def _choose_actmax_channels(self, spec) -> list[tuple[str, int]]:
        shapes = {t.name: t.output_shape for t in self._traces}
        targets: list[tuple[str, int]] = []
        if isinstance(spec, Mapping):
            for name, chans in spec.items():
                layer, _ = resolve_layer(self._net, name)
                if layer not in self.layers["actmax"]:
                    self.layers["actmax"].append(layer)
                targets += [(layer, int(c)) for c in chans]
        else:
            for layer in self.layers["actmax"]:
                total = shapes[layer][1]
                count = min(spec, total)
                picks = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
                targets += [(layer, c) for c in picks]
        for layer, channel in targets:
            shape = shapes.get(layer)
            if shape is None or len(shape) != 4:
                raise ValueError(f"actmax layer {layer!r} must output a spatial map [N, C, H, W], got {shape}")
            if not 0 <= channel < shape[1]:
                raise ValueError(f"actmax channel {channel} out of range: layer {layer!r} has {shape[1]} channels")
        return targets

    # ------------------------------------------------------------------ public API
    @property
    def writer(self):
        """The ``SummaryWriter`` (created on first use, on the logging rank only)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._log_dir)
        return self._writer

    def due(self, global_step: int) -> tuple[str, ...]:
        """The kinds whose interval divides ``global_step`` (at step 0: all but activation maximization)."""
        schedule = self._schedule if global_step else self._schedule_at_zero
        return tuple(kind for kind, n in schedule if global_step % n == 0)

    def step(self, global_step: int) -> bool:
        """Log the kinds due at ``global_step``; returns whether anything was logged.

        Call it once per training step, anywhere in the loop (also between ``backward()`` and
        ``optimizer.step()``). When nothing is due it returns at once: no hook, no tensor operation.
        """
        if not self._active or self._closed:
            return False
        last = self._last_logged
        schedule = self._schedule if global_step else self._schedule_at_zero
        due = [kind for kind, n in schedule if global_step % n == 0 and last.get(kind) != global_step]
        if not due:
            return False
        return self.log_now(global_step, due)

    def log_now(self, global_step: int, kinds: Iterable[str] | None = None) -> bool:
        """Log ``kinds`` (default: every enabled kind) at ``global_step`` now, whatever the schedule says.

        A failing kind warns once (or raises with ``strict=True``) and the others still log; the events of
        this step are flushed to disk before returning.
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        if self._closed:
            raise RuntimeError("this VisLogger is closed")
        kinds = check_kinds(kinds, default=self.kinds)
        if not self._active:
            return False
        with self._lock:
            try:
                self._log(global_step, kinds)
            finally:
                for kind in kinds:
                    self._last_logged[kind] = global_step
                if self._writer is not None:
                    self._writer.flush()
        return True

    def close(self) -> None:
        """Wait for background work, flush, and close the writer if we created it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._drop_parents_threads()
        try:
            for future in list(self._pending):
                with contextlib.suppress(Exception):
                    future.result()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
        finally:
            _open_loggers.discard(self)
            if self._writer is not None:
                if self._owns_writer:
                    self._writer.close()
                elif getattr(self._writer, "all_writers", None) is not None:
                    self._writer.flush()

    def __enter__(self) -> VisLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ logging step
    def _probe_tensor(self) -> torch.Tensor:
        """The probe on the model's current device and dtype (cached; the model may move after construction)."""
        device, dtype = model_device(self._net), model_dtype(self._net)
        cache = self._probe_cache
        if cache is None or cache[0] != device or cache[1] != dtype:
            self._probe_cache = cache = (device, dtype, self.probe.images.to(device=device, dtype=dtype))
        return cache[2]

    def _guarded(self, kind: str, step: int, fn: Callable[[], object]) -> object:
        """Run one visual; on failure warn once per (kind, error type) and go on, or raise when strict."""
        try:
            return fn()
        except Exception as e:
            if self.strict:
                raise
            key = (kind, type(e).__name__)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"cnnvis_tb: the {kind} visual failed at step {step} and is skipped "
                    f"({type(e).__name__}: {e}); training continues. Pass strict=True to raise instead.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None

    def _warn_once(self, key: str, message: str) -> None:
        if ("note", key) not in self._warned:
            self._warned.add(("note", key))
            warnings.warn(f"cnnvis_tb: {message}", RuntimeWarning, stacklevel=5)

    def _log(self, step: int, kinds: tuple[str, ...]) -> None:
        with preserved(self._net):
            if not self._table_logged:
                self._guarded("summary", step, lambda: self._log_table(step))
                self._table_logged = True
            record = shown = None
            if any(k in _PROBE_KINDS for k in kinds):
                record = self._guarded("probe", step, lambda: self._probe_pass(kinds))
                shown = denormalize(self.probe.images, self.mean, self.std)
            for kind in kinds:
                log = getattr(self, f"_log_{kind}")
                if kind == "actmax":  # the one kind doing real network work here: keep every thread
                    self._guarded(kind, step, lambda log=log: log(step))
                    continue
                if kind == "saliency" and record is not None:  # its network passes: with every thread
                    self._saliency_gradients(step, record)
                with single_threaded():  # the rest renders small pictures
                    if kind not in _PROBE_KINDS:
                        self._guarded(kind, step, lambda log=log: self._written(log, step))
                    elif record is not None:
                        self._guarded(kind, step, lambda log=log: self._written(log, step, record, shown))

    def _written(self, log: Callable[..., None], *args) -> None:
        """Run one kind's logging; the pictures it added (encoded meanwhile on a helper thread) are written
        before it counts as done, also those made before a failure."""
        self._pictures = PictureWriter(self.writer)
        try:
            log(*args)
        finally:
            self._pictures.flush()

    def _each_layer(self, kind: str) -> Iterator[tuple[str, nn.Module]]:
        """The kind's layers still in the model; after them, a LookupError naming any that are gone, so one
        removed layer does not stop the others from logging."""
        present = _lookup(self._net, self.layers[kind], missing_ok=True)
        yield from present.items()
        if len(present) < len(self.layers[kind]):
            _lookup(self._net, self.layers[kind])

    def _log_table(self, step: int) -> None:
        self.writer.add_text(tags.text_tag("model", "layers"), layer_table(self._net, traces=self._traces), step)

    def _probe_pass(self, kinds: tuple[str, ...]) -> _ProbePass:
        """One forward over the probe serving features, Grad-CAM (every layer, both targets) and saliency."""
        want_cam, want_sal = "gradcam" in kinds, "saliency" in kinds and "vanilla" in self.saliency_methods
        x = self._probe_tensor().detach()
        if want_sal:
            x = x.clone().requires_grad_(True)
        with contextlib.ExitStack() as stack:
            cam_acts = stack.enter_context(
                capture(_lookup(self._net, self.layers["gradcam"], missing_ok=True), for_grad=True)
            ) if want_cam else {}
            feature_acts = stack.enter_context(
                capture(_lookup(self._net, self.layers["features"], missing_ok=True))
            ) if "features" in kinds else {}
            with torch.set_grad_enabled(want_cam or want_sal):
                scores = select_output(self._net(x), self.output_selector)
        record = _ProbePass(scores=scores, inputs=x, cam_acts=dict(cam_acts), feature_acts=dict(feature_acts))
        if not torch.isfinite(scores.detach()).all():
            self._warn_once("nonfinite-scores", "the model's outputs on the probe hold NaN or inf values")
        if want_cam or want_sal:
            self._gradients(record, want_cam, want_sal)
        return record

    def _targets(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = scores.detach().argmax(dim=1)
        targets = {"pred": pred}
        if self.probe.labels is not None:
            targets["true"] = self.probe.labels.to(pred.device)
        return targets

    def _gradients(self, record: _ProbePass, want_cam: bool, want_sal: bool) -> None:
        """Gradients of each target's scores w.r.t. every Grad-CAM layer (and the input), one backward per
        distinct target set: when every prediction is right, 'true' reuses the 'pred' gradients."""
        names = list(record.cam_acts) if want_cam else []
        inputs = [record.cam_acts[n] for n in names] + ([record.inputs] if want_sal else [])
        targets = self._targets(record.scores)
        keys = list(targets)
        for i, key in enumerate(keys):
            t = targets[key]
            same = next((k for k in keys[:i] if torch.equal(targets[k], t)), None)
            if same is not None:
                record.grads[key] = record.grads[same]
                continue
            last = all(torch.equal(targets[k], targets[key]) for k in keys[i + 1 :])
            score = record.scores.gather(1, t[:, None]).sum()
            grads = torch.autograd.grad(score, inputs, retain_graph=not last, allow_unused=True)
            record.grads[key] = dict(zip(names + (["input"] if want_sal else []), grads, strict=True))

    def _class_label(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class {index}"

    def _log_gradcam(self, step: int, record: _ProbePass, shown: torch.Tensor) -> None:
        size = tuple(self.probe.images.shape[-2:])
        probs = record.scores.detach().float().softmax(dim=1).cpu()
        targets = {k: v.cpu() for k, v in self._targets(record.scores).items()}
        order = [k for k in ("true", "pred") if k in targets]
        panel = 96  # px per panel: legible captions, small files for big inputs
        inputs = fit(as_rgb(shown), panel, panel)
        for layer, _ in self._each_layer("gradcam"):
            acts = record.cam_acts[layer]
            columns = []  # (overlays [N, 3, panel, panel], method label, target key), all images at once
            for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++")):
                for key in order:
                    grads = record.grads[key][layer]
                    if grads is None:
                        raise RuntimeError(f"the class scores do not depend on layer {layer!r}")
                    maps = normalize_maps(cam_from_gradients(acts, grads, method), size).cpu()
                    columns.append((fit(overlay_heatmap(shown, maps), panel, panel), label, key))
            for i in range(shown.shape[0]):
                true = f"true: {self._class_label(int(targets['true'][i]))}" if "true" in targets else "label unknown"
                panels = [caption(inputs[i], ["input", true])]
                for overlays, label, key in columns:
                    cls = int(targets[key][i])
                    panels.append(caption(overlays[i], [label, f"{key}: {self._class_label(cls)} {probs[i, cls]:.0%}"]))
                strip = make_grid(torch.stack(panels), ncol=len(panels), padding=2)
                self._pictures.add(tags.image_tag("gradcam", layer, tags.probe_view(i)), to_uint8(strip), step)

    def _saliency_target(self) -> str:
        return "true" if self.probe.labels is not None else "pred"

    def _saliency_gradients(self, step: int, record: _ProbePass) -> None:
        """Input gradients of every saliency method for the true (else predicted) class of each probe image; a
        method that fails warns once (or raises when strict) and the others are still shown."""
        key = self._saliency_target()
        targets = self._targets(record.scores)[key]

        def gradients(method: str) -> torch.Tensor:
            if method == "vanilla":  # from the shared forward pass
                return record.grads[key]["input"]
            return input_gradients(self._net, record.inputs.detach(), targets, method, seed=self.seed,
                                   batch_size=len(targets), output_selector=self.output_selector)[0]

        record.saliency_grads = {}
        for method in self.saliency_methods:
            grads = self._guarded(f"saliency ({method})", step, lambda m=method: gradients(m))
            if grads is not None:
                record.saliency_grads[method] = grads

    def _log_saliency(self, step: int, record: _ProbePass, shown: torch.Tensor) -> None:
        if not record.saliency_grads:  # every method failed, and said so
            return
        key = self._saliency_target()
        targets = self._targets(record.scores)[key].cpu()
        labels = {"vanilla": "gradient", "smoothgrad": "SmoothGrad", "guided": "guided BP"}
        panel = 96
        columns = [(fit(colorize(saliency_from_gradients(record.saliency_grads[m]).cpu(), "inferno"), panel, panel),
                    labels[m]) for m in record.saliency_grads]
        inputs = fit(as_rgb(shown), panel, panel)
        for i in range(shown.shape[0]):
            target = f"{key}: {self._class_label(int(targets[i]))}"
            panels = [caption(inputs[i], ["input", target])]
            panels += [caption(maps[i], [label, target]) for maps, label in columns]
            strip = make_grid(torch.stack(panels), ncol=len(panels), padding=2)
            self._pictures.add(tags.image_tag("saliency", "input", tags.probe_view(i)), to_uint8(strip), step)

    def _log_features(self, step: int, record: _ProbePass, shown: torch.Tensor) -> None:
        for layer, _ in self._each_layer("features"):
            acts = record.feature_acts.get(layer)
            if acts is None:
                raise RuntimeError(f"layer {layer!r} did not run in the forward pass")
            if acts.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs {tuple(acts.shape)}, not a feature map [N, C, H, W]")
            if not torch.isfinite(acts).all():
                self._warn_once(f"nonfinite-features-{layer}", f"feature maps of {layer!r} hold NaN or inf values")
            for i, panel in enumerate(feature_panels(shown, acts.float().cpu(), k=self.top_k)):
                self._pictures.add(tags.image_tag("features", layer, tags.probe_view(i)), to_uint8(panel), step)

    def _log_kernels(self, step: int) -> None:
        for layer, module in self._each_layer("kernels"):
            grid = render_kernels(getattr(module, "weight", None), max_kernels=self.max_kernels)
            if grid.nonfinite:
                self._warn_once(f"nonfinite-kernels-{layer}", f"{grid.nonfinite} weights of {layer!r} are NaN or inf")
            self._pictures.add(tags.image_tag("kernels", layer, "grid"), grid.pixels, step)
            note = grid.note
            if note and layer not in self._notes_logged:
                self._notes_logged.add(layer)
                self.writer.add_text(tags.text_tag(layer, "kernels"), f"{layer}: {note}", step)

    def _log_histograms(self, step: int) -> None:
        skipped = log_histograms(self.writer, self._net, step)
        for tag, count in skipped.items():
            self._warn_once(f"hist-{tag}", f"{count} non-finite values left out of the histogram {tag}")

    # ------------------------------------------------------------------ activation maximization
    def _actmax_images(self, net: nn.Module) -> dict[str, torch.Tensor]:
        wanted = list(dict.fromkeys(layer for layer, _ in self._actmax_targets))
        modules = _lookup(net, wanted, missing_ok=True)
        targets = [(layer, c) for layer, c in self._actmax_targets if layer in modules]
        if not targets:
            _lookup(net, wanted)  # raises, naming the missing layers
        layers = list(modules)
        order = {t.name: t.order for t in self._traces}
        images = optimize_channels(
            net,
            modules,
            targets,
            tuple(self.probe.images.shape[-2:]),
            self.probe.images.shape[1],
            mean=self.mean,
            std=self.std,
            config=self._actmax_config,
            stop_after=max(layers, key=lambda n: order.get(n, -1)),
        ).cpu()
        return {layer: images[[i for i, (name, _) in enumerate(targets) if name == layer]] for layer in layers}

    def _write_actmax(self, step: int, per_layer: dict[str, torch.Tensor]) -> None:
        with self._lock:
            pictures = PictureWriter(self.writer)  # its own: this may run on the background worker
            for layer, images in per_layer.items():
                channels = [c for name, c in self._actmax_targets if name == layer]
                grid = make_grid(fit(as_rgb(images), 64, 96), ncol=min(8, len(channels)), padding=2)
                picture = caption(grid, [f"{layer} channels: " + " ".join(map(str, channels))])
                pictures.add(tags.image_tag("actmax", layer, "channels"), to_uint8(picture), step)
            pictures.flush()
            self.writer.flush()

    def _log_actmax(self, step: int) -> None:
        if not self.actmax_background:
            self._write_actmax(step, self._actmax_images(self._net))
            _lookup(self._net, self.layers["actmax"])  # after the layers still there have logged
            return
        self._drop_parents_threads()
        self._pending = [f for f in self._pending if not f.done()]
        if self._pending:
            self._warn_once("actmax-busy", f"activation maximization of an earlier step is still running; "
                            f"step {step} is skipped (use a larger every['actmax'])")
            return
        snapshot = self._snapshot()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnvis-actmax")
        self._pending.append(self._executor.submit(self._background_actmax, snapshot, step))

    def _drop_parents_threads(self) -> None:
        """In a process forked from the one that started the background worker, that worker does not exist:
        forget it and its unfinished work (the parent finishes and logs it), so nothing waits on it forever."""
        if os.getpid() != self._pid:
            self._pid, self._executor, self._pending = os.getpid(), None, []

    def _snapshot(self) -> nn.Module:
        """A frozen copy of the model (eval mode, no gradients) for background work."""
        with torch.no_grad():
            snapshot = copy.deepcopy(self._net)
        for p in snapshot.parameters():
            p.grad = None
            p.requires_grad_(False)
        return snapshot.eval()

    def _background_actmax(self, snapshot: nn.Module, step: int) -> None:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                per_layer = self._actmax_images(snapshot)
            self._write_actmax(step, per_layer)
        except Exception as e:
            if self.strict:
                raise
            self._warn_once(f"actmax-bg-{type(e).__name__}", f"background activation maximization failed at step "
                            f"{step}: {type(e).__name__}: {e}")


# Loggers still open at interpreter exit are closed, so queued events reach the disk.
_open_loggers: weakref.WeakSet[VisLogger] = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:
    for vis in list(_open_loggers):
        with contextlib.suppress(Exception):
            vis.close()

