"""``Kind``: one visual the logger can log, declared in one class.

A kind says what the logger needs to know about it and nothing else lives in :class:`~cnnvis_tb.VisLogger`:

* ``name`` (its tag family ``cnnvis/<name>/...``) and ``label`` (the CNN Vis tab's button);
* ``every`` (default steps between logs) and ``at_step_zero`` (logged at step 0 or first at ``every``);
* ``layer_role``: ``"any"`` (any module that runs in the forward pass), ``"conv"`` (2-D convolutions only) or
  ``None`` (takes no layers); :meth:`Kind.default_layers` is its automatic choice;
* :meth:`Kind.needs`: what it takes from the one shared forward pass over the probe (layer outputs, gradients
  with respect to layers or to the input, for the true and predicted class);
* :meth:`Kind.setup`: checks against the model, run in ``VisLogger(...)`` so bad input fails before training;
* :meth:`Kind.compute` (network work, all threads) and :meth:`Kind.log` (rendering and writing, through the
  :class:`Output` handed to it); :meth:`Kind.close`;
* ``log_in_background``: whether :meth:`Kind.log` may run on the logger's worker thread (asynchronous logging,
  ``VisLogger(async_logging=True)``) while training goes on. Only a kind whose ``log`` reads nothing the training
  loop changes may say so: no call of the model, no parameter, gradient or buffer (read those in ``compute`` and
  return copies), no global RNG. ``ctx.shared`` it gets there is a detached copy of the probe pass (no autograd
  graph); ``ctx.net`` may still be looked at for its module names. Default False: a user's kind logs on the
  training thread unless it opts in; every built-in kind opts in.

The logger runs both under its safety guard (eval mode, RNG, flags and hooks restored), on its schedule, with
warn-once / ``strict`` and a flush after each logging step, for built-in and user kinds alike.

A kind of one's own::

    class ChannelMeans(Kind):
        name, label, every = "channel_means", "Channel means", 50

        def needs(self):
            return Needs(activations=self.layers)

        def log(self, ctx, out, computed):
            for layer in self.layers:
                means = ctx.shared.activations[layer].mean(dim=(2, 3))       # [N, C]
                out.image(layer, "all", colorize(normalize(means)))

    vis = VisLogger(model, "runs/exp", probe=images, kinds=["gradcam", ChannelMeans(every=20)])
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.events import PictureWriter, is_torch_writer
from cnnvis_tb.layers import LayerTrace, conv_layers, default_cam_layer, find_layers, resolve_layer
from cnnvis_tb.probe import Probe
from cnnvis_tb.render import denormalize, to_uint8
from cnnvis_tb.safety import foreign_hooks

_log = logging.getLogger("cnnvis_tb")

if TYPE_CHECKING:  # pragma: no cover
    from cnnvis_tb.probe_pass import ProbePass

__all__ = ["Kind", "Needs", "ModelInfo", "StepContext", "Output", "LAYER_ROLES", "positive_int", "check_every"]

#: What a kind's layers may be: any module that runs, 2-D convolutions only, or no layers at all.
LAYER_ROLES = ("any", "conv", None)


@dataclass(frozen=True)
class Needs:
    """What a kind takes from the shared probe pass (one forward, one ``autograd.grad`` per target set).

    Attributes:
        activations: layers whose outputs it reads, as detached copies (``shared.activations[name]``).
        graph_activations: layers whose outputs it reads in the autograd graph, with the gradients of each
            target's class scores with respect to them (``shared.graph_activations``, ``shared.grads``).
        input_gradients: it reads the gradients of each target's scores with respect to the probe input.
        own_gradients: layers whose own outputs it needs the gradients of, taken before any in-place op that
            follows the layer (``ReLU(inplace=True)``, ``+=``), under ``shared.grads[target]["<layer>:own"]``;
            ``graph_activations`` are the outputs as the network consumes them (FullGrad's bias terms need these).
        scores: it reads the class scores (``shared.scores``, ``shared.targets``) even without the above.
    """

    activations: tuple[str, ...] = ()
    graph_activations: tuple[str, ...] = ()
    input_gradients: bool = False
    scores: bool = False
    own_gradients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("activations", "graph_activations", "own_gradients"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"Needs.{name} must be a sequence of layer names, got {value!r}")
            object.__setattr__(self, name, tuple(dict.fromkeys(value)))

    @property
    def forward(self) -> bool:
        """Whether the shared forward pass is needed at all."""
        return bool(self.activations or self.gradients or self.scores)

    @property
    def gradients(self) -> bool:
        return bool(self.graph_activations or self.own_gradients or self.input_gradients)

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            activations=self.activations + other.activations,
            graph_activations=self.graph_activations + other.graph_activations,
            input_gradients=self.input_gradients or other.input_gradients,
            scores=self.scores or other.scores,
            own_gradients=self.own_gradients + other.own_gradients,
        )


@dataclass
class ModelInfo:
    """What a kind may look at in :meth:`Kind.setup` and keep for its logging steps.

    ``net`` is the unwrapped model; ``traces`` what one eval-mode forward pass over the probe showed about each
    module (call order, output shape); ``probe`` the probe images (CPU, as the model sees them) and labels.
    """

    net: nn.Module
    traces: list[LayerTrace]
    probe: Probe
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None
    output_selector: Callable[[object], torch.Tensor] | None = None
    seed: int = 0
    strict: bool = False
    #: Warns once per key (``warn_once(key, message)``), as every cnnvis_tb warning does.
    warn_once: Callable[[str, str], None] = field(default=lambda key, message: None, repr=False)
    #: ``guard(what, step, fn)``: runs ``fn``; on failure warns once (``strict``: raises) and returns None.
    guard: Callable[[str, int, Callable[[], object]], object] = field(default=lambda what, step, fn: fn(), repr=False)
    #: ``open_output(kind, step)``: a context manager yielding an :class:`Output` that is written and flushed on
    #: exit, under the logger's lock; for kinds that finish their work later on a thread of their own.
    open_output: Callable[[Kind, int], Any] | None = field(default=None, repr=False)
    #: Whether the ``log`` of a kind with ``log_in_background`` runs on the asynchronous-logging worker (after the
    #: training loop has gone on) rather than right after its ``compute``.
    in_background: bool = False
    #: Whether a forward pass of the model in eval mode drew from the global RNG (seen on the probe: noise layers,
    #: Monte-Carlo dropout). Such a model never runs on another thread: there it would move the RNG training uses.
    draws_random: bool = False

    #: ``{what: hazard}`` last said by :meth:`may_run_elsewhere`, so each reason is logged once per piece of work.
    _said_hazards: dict[str, str] = field(default_factory=dict, repr=False)

    def background_hazard(self, net: nn.Module) -> str | None:
        """Why work that runs ``net`` (or a copy of it) must stay on the training thread, or None: it draws random
        numbers in eval mode, or it has hooks of the user's (:func:`cnnvis_tb.safety.foreign_hooks`)."""
        if self.draws_random:
            return "draws random numbers in eval mode (from the global RNG, which training uses)"
        hooks = foreign_hooks(net)
        return None if hooks is None else f"has hooks of its own ({hooks})"

    def may_run_elsewhere(self, net: nn.Module, what: str) -> bool:
        """Whether ``what`` (work that runs ``net``) may run on another thread (:meth:`background_hazard`); when
        not, it says why once (each new reason once again)."""
        hazard = self.background_hazard(net)
        if hazard is not None and self._said_hazards.get(what) != hazard:
            self._said_hazards[what] = hazard
            _log.info("%s runs on the training thread, not in the background: the model %s", what, hazard)
        return hazard is None

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """``{name: output shape}`` of every module on the probe (None: no tensor output or never ran)."""
        return {t.name: t.output_shape for t in self.traces}

    @property
    def ran(self) -> set[str]:
        """Names of the modules that ran in the forward pass over the probe."""
        return {t.name for t in self.traces if t.order >= 0}

    def spread_layers(self, count: int = 3) -> list[str]:
        """``count`` convolutions spread over the model's depth, first and last included."""
        return find_layers(self.net, count)

    def cam_layer(self) -> str:
        """The last convolutional block before global pooling (the usual Grad-CAM layer)."""
        return default_cam_layer(self.traces)

    def class_label(self, index: int) -> str:
        """The class's name, or ``class <index>`` without ``class_names``."""
        return self.class_names[index] if self.class_names else f"class {index}"


@dataclass
class StepContext:
    """What a kind gets at a logging step. The model is in eval mode and every flag, the RNG and the hooks are
    put back by the logger afterwards; ``shared`` is the shared probe pass (None when no due kind needs it)."""

    step: int
    info: ModelInfo
    inputs: torch.Tensor  # the probe on the model's device and dtype, as the model sees it
    shared: ProbePass | None = None
    _shown: torch.Tensor | None = field(default=None, repr=False)

    @property
    def net(self) -> nn.Module:
        return self.info.net

    @property
    def shown(self) -> torch.Tensor:
        """The probe images as people see them: ``[N, C, H, W]`` in ``[0, 1]``, de-normalized, on the CPU."""
        if self._shown is None:
            self._shown = denormalize(self.info.probe.images, self.info.mean, self.info.std)
        return self._shown

    def warn_once(self, key: str, message: str) -> None:
        self.info.warn_once(key, message)

    def guarded(self, what: str, fn: Callable[[], object]) -> object:
        """``fn()``, or None after a warning (once per ``what`` and error type) when it fails; raises when strict.
        For a part of a kind that may fail while the rest still logs (one of several methods)."""
        return self.info.guard(what, self.step, fn)


def _kept(value: object) -> object:
    """``value`` as it is now: tensors and arrays are copied, so a buffer the kind reuses writes what it held."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if hasattr(value, "__array_interface__") and hasattr(value, "copy"):  # numpy arrays
        return value.copy()
    if isinstance(value, dict):
        return {k: _kept(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # (a named tuple or other subclass is passed as it is)
        return type(value)(_kept(v) for v in value)
    return value


class _KeptWriter:
    """A writer (or PyTorch's event file writer) as a kind sees it while it renders: its ``add_*`` calls are kept,
    with their arguments as they are at the call, and made by :meth:`Output.flush` under the logger's write lock;
    once the kind's step has ended they are made at once, under the lock. Anything else (``log_dir``,
    ``flush()``, ...) goes to the object itself, calls under the lock. ``isinstance`` sees the object's class."""

    def __init__(self, target, lock, *, copy_args: bool, current=None) -> None:
        # current(): the object to write to when a call is made (PyTorch's writer may have reopened its file writer)
        self.__dict__.update(_target=target, _lock=lock, _calls=[], _copy_args=copy_args, _passing=False,
                             _current=current or (lambda: target), _state=threading.Lock())

    @property
    def __class__(self):  # noqa: D105 (isinstance(out.writer, TheirWriter) holds)
        return type(self._target)

    def __getattr__(self, name: str):
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        if name.startswith("add_"):
            def write(*args, **kwargs):
                return getattr(self._current(), name)(*args, **kwargs)

            def kept(*args, **kwargs):
                if self._copy_args:
                    args, kwargs = tuple(_kept(a) for a in args), {k: _kept(v) for k, v in kwargs.items()}
                with self._state:  # the check and the append in one go, against the hand-over
                    if not self._passing and not (self._copy_args and name == "add_figure"):
                        self._calls.append((write, args, kwargs))
                        return None
                # after the kind's step (a thread of the kind's own, a kept reference), or a figure for a writer
                # other than PyTorch's (it renders the figure when it writes; it cannot be copied)
                with self._lock:
                    return write(*args, **kwargs)

            return kept

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked

    def __setattr__(self, name: str, value) -> None:
        setattr(self._target, name, value)

    def _hand_over(self) -> list[tuple[Callable, tuple, dict]]:
        """The calls kept so far, in order (for :meth:`Output.flush` to make); from now on ``add_*`` calls are made
        at once (under the lock)."""
        with self._state:
            calls, self.__dict__["_calls"] = self._calls, []
            self.__dict__["_passing"] = True
        return calls


def _summary_writer_for(writer, lock) -> tuple[object, _KeptWriter]:
    """For PyTorch's ``SummaryWriter``: a shallow copy of it whose event file writer keeps its records. Its
    ``add_*`` methods build their summaries at the call (values, figures and histograms as they are then; the
    binning and encoding outside the lock), and only the records' writes wait for :meth:`Output.flush`."""
    with lock:
        file_writer = writer._get_file_writer()
    records = _KeptWriter(file_writer, lock, copy_args=False, current=writer._get_file_writer)
    own = copy.copy(writer)
    own.file_writer, own.all_writers = records, {file_writer.get_logdir(): records}
    own.close = own.flush  # (and __exit__): the event file writer is shared with the user's writer, which stays open
    return own, records


class Output:
    """Where a kind writes at one logging step: every tag in its own family ``cnnvis/<kind>/<layer>/<view>``.

    Pictures are PNG-encoded on helper threads while the kind renders the next one. Nothing is written while the
    kind renders: pictures, numbers and texts are written in order when the kind's step ends (also those made before
    a failure), in one go under ``lock`` (the logger's write lock), so the training thread and the logger's worker
    never wait for each other's rendering. ``writer`` is the writer for what the helpers below do not cover (for
    PyTorch's ``SummaryWriter``, a copy of it): its ``add_*`` calls take their values at the call and are written
    with the rest.
    """

    def __init__(self, kind: str, writer, step: int, lock=None) -> None:
        self.kind = kind
        self.step = step
        self._lock = lock if lock is not None else contextlib.nullcontext()
        if is_torch_writer(writer):  # self._kept: where the writes are kept until flush
            self.writer, self._kept = _summary_writer_for(writer, self._lock)
            self._pictures = PictureWriter(writer)  # encoded pictures, written by flush
        else:  # another writer's add_* calls (add_image for pictures too) are kept with copies of their arguments
            self.writer = self._kept = _KeptWriter(writer, self._lock, copy_args=True)
            self._pictures = PictureWriter(self.writer)
        self._panels: dict[str, dict[str, list[dict]]] = {}  # layer -> view -> panel records

    def image(self, layer: str, view: str, picture: torch.Tensor, panels: list[dict] | None = None) -> None:
        """One picture ``[C, H, W]`` (uint8, or float in ``[0, 1]``; C is 1 or 3) under
        ``cnnvis/<kind>/<layer>/<view>``.

        ``panels`` (from :func:`cnnvis_tb.render.captioned_strip`) says where the picture's panels lie and what
        their captions say: written once per layer and step beside the pictures (:func:`cnnvis_tb.tags.panels_tag`),
        so the CNN Vis tab shows a panel alone and its caption as text.
        """
        if not isinstance(picture, torch.Tensor) or picture.dim() != 3 or picture.shape[0] not in (1, 3):
            shape = tuple(picture.shape) if isinstance(picture, torch.Tensor) else type(picture).__name__
            raise ValueError(f"a picture must be a tensor [C, H, W] with C = 1 or 3, got {shape}")
        if picture.dtype != torch.uint8:
            picture = to_uint8(picture.float())
        if picture.shape[0] == 1:
            picture = picture.expand(3, -1, -1)
        self._pictures.add(tags.image_tag(self.kind, layer, view), picture, self.step)
        if panels:
            self._panels.setdefault(layer, {})[view] = panels
        if self._kept._passing:  # after the kind's step: written at once
            self.flush()

    def scalar(self, layer: str, name: str, value: float) -> None:
        """One number under ``cnnvis/metrics/<kind>/<layer>/<name>`` (the Scalars tab and tbparse read it)."""
        self.writer.add_scalar(tags.metric_tag(self.kind, layer, name), float(value), self.step)

    def text(self, layer: str, text: str) -> None:
        """A Markdown text under ``cnnvis/summary/<layer>/<kind>`` (shown in the Text tab and the layer card)."""
        self.writer.add_text(tags.text_tag(layer, self.kind), text, self.step)

    def flush(self) -> None:
        """Write what was added so far: the writer calls, the pictures and their panel records, under the lock (the
        logger calls this when the kind's step ends; the pictures' encoding is waited for before the lock is taken).
        Writes made through :attr:`writer` after this are made at once. A failed write does not keep the others
        from being written; the first error is raised after them."""
        for layer, views in self._panels.items():
            self.writer.add_text(tags.panels_tag(self.kind, layer), tags.panels_text(views), self.step)
        self._panels.clear()
        self._pictures.wait()
        error: BaseException | None = None
        with self._lock:
            for call, args, kwargs in self._kept._hand_over():
                try:
                    call(*args, **kwargs)
                except Exception as e:
                    error = error or e
            try:
                self._pictures.flush()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error


class Kind:
    """Base class of every visual kind, built-in or the user's own; see the module docs.

    Args:
        every: steps between logs (default: the class's ``every``); ``VisLogger(every=...)`` overrides it.
        layers: ``named_modules()`` names of the layers to look at (default: :meth:`default_layers`);
            ``VisLogger(layers={name: [...]})`` overrides it.
    """

    #: The tag family ``cnnvis/<name>/...`` and the name in ``kinds=[...]`` / ``every={...}``.
    name: ClassVar[str] = ""
    #: The label of the kind's button in the CNN Vis tab.
    label: ClassVar[str] = ""
    #: Default steps between two logs.
    every: int = 200
    #: Whether the schedule logs it at step 0 (else first at ``every``; ``log_now`` logs it whenever asked).
    at_step_zero: ClassVar[bool] = True
    #: ``"any"``, ``"conv"`` or ``None`` (see :data:`LAYER_ROLES`).
    layer_role: ClassVar[str | None] = "any"
    #: Whether a plain list ``VisLogger(layers=[...])`` names this kind's layers (else only a mapping does).
    follows_layer_list: ClassVar[bool] = True
    #: Built-in kinds only: whether ``VisLogger`` logs it when ``kinds`` is not given.
    on_by_default: ClassVar[bool] = True
    #: Whether :meth:`log` may run on the logger's background worker under ``VisLogger(async_logging=True)``
    #: (see the module docs for what such a ``log`` must not read). False: it runs on the training thread.
    log_in_background: ClassVar[bool] = False

    def __init__(self, *, every: int | None = None, layers: Sequence[str] | str | None = None) -> None:
        #: Whether the interval was given here (then ``VisLogger(every=<int>)`` does not override it).
        self.every_given = every is not None
        if every is not None:
            self.every = check_every(self.name or type(self).__name__, every)
        self.layers: list[str] = []
        self._given_layers = [layers] if isinstance(layers, str) else (None if layers is None else list(layers))
        self.info: ModelInfo | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Kind:
        """The kind built from ``VisLogger``'s keyword options (built-in kinds read theirs, e.g. ``top_k``)."""
        return cls()

    # ------------------------------------------------------------------ declared
    def default_layers(self, info: ModelInfo) -> list[str]:
        """The automatic layer choice: three convolutions spread over depth."""
        return info.spread_layers(3)

    def needs(self) -> Needs:
        """What this kind takes from the shared probe pass at a logging step (default: nothing)."""
        return Needs()

    def setup(self, info: ModelInfo) -> None:
        """Check the kind against the model, in ``VisLogger(...)``; raise ``ValueError`` naming the problem and
        the fix. The base class resolves the layers; override to check more, and call ``super().setup(info)``."""
        self.info = info
        if self.layer_role is None:
            return
        names = self._given_layers if self._given_layers is not None else self.default_layers(info)
        self.layers = self.resolve_layers(info, names)

    def compute(self, ctx: StepContext) -> object:
        """Network work beyond the shared pass (extra forward / backward passes), run with every thread."""
        return None

    def log(self, ctx: StepContext, out: Output, computed: object) -> None:
        """Render and write this step's pictures through ``out``; ``computed`` is what :meth:`compute` returned."""
        raise NotImplementedError(f"{type(self).__name__} must define log(ctx, out, computed)")

    def wait_for_background(self) -> None:
        """Wait for work of the kind's own (a background thread) to finish, and go on accepting more: the logger
        calls it from ``vis.wait()`` and when the main thread ends."""

    def close(self) -> None:
        """Wait for work of the kind's own (a background thread) to finish; the logger calls it once."""

    # ------------------------------------------------------------------ helpers
    def details(self) -> str:
        """One line for the kinds table of the run (interval and layers)."""
        text = f"every {self.every} steps" + ("" if self.at_step_zero else ", not at step 0")
        return text + (f"; layers: {', '.join(self.layers)}" if self.layers else "")

    def resolve_layers(self, info: ModelInfo, names: Sequence[str | nn.Module]) -> list[str]:
        """``named_modules()`` names of ``names`` (names or modules), checked for the kind's layer role."""
        if isinstance(names, (str, nn.Module)):
            names = [names]
        resolved = [resolve_layer(info.net, n, need_conv=self.layer_role == "conv")[0] for n in names]
        if not resolved:
            raise ValueError(f"layers[{self.name!r}] is empty; name at least one layer or leave it out")
        if self.layer_role != "conv":  # kernel grids read weights; the others need the layer to run
            silent = [n for n in resolved if n not in info.ran]
            if silent:
                raise ValueError(f"layers {silent} for {self.name} did not run in the model's forward pass on the "
                                 "probe")
        return list(dict.fromkeys(resolved))

    def layers_from_list(self, info: ModelInfo, names: list[str | nn.Module]) -> list[str | nn.Module] | None:
        """This kind's layers when ``VisLogger(layers=[...])`` is a plain list (None: keep the automatic choice)."""
        if not self.follows_layer_list or self.layer_role is None:
            return None
        if self.layer_role == "conv":
            convs = dict(conv_layers(info.net))
            picked = [n for n in names if (n in convs if isinstance(n, str) else any(m is n for m in convs.values()))]
            return picked or None
        return names

    def each_layer(self, net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The kind's layers still in ``net``; after them, a ``LookupError`` naming any that are gone, so one
        removed layer does not stop the others from logging."""
        modules = dict(net.named_modules())
        for name in self.each_present([n for n in self.layers if n in modules]):
            yield name, modules[name]

    def present_layers(self, net: nn.Module) -> list[str]:
        """The kind's layers still in ``net`` (for :meth:`compute`; :meth:`each_present` walks them in ``log``)."""
        modules = dict(net.named_modules())
        return [n for n in self.layers if n in modules]

    def each_present(self, present: Sequence[str]) -> Iterator[str]:
        """``present`` (from :meth:`present_layers`), then a ``LookupError`` naming the kind's layers not in it."""
        yield from present
        missing = [n for n in self.layers if n not in present]
        if missing:
            raise LookupError(
                f"layers {missing} are no longer in the model (removed or renamed after VisLogger was created); "
                "create a new VisLogger for the changed model"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, every={self.every})"


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1, else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_every(kind: str, value: object) -> int:
    """``value`` if it is a valid interval (an int >= 1), else an error naming the kind."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"every[{kind!r}] must be a positive int (steps between logs), got {value!r}")
    if value < 1:
        raise ValueError(f"every[{kind!r}] must be >= 1 (steps between logs), got {value}; leave a kind out of "
                         "`kinds` to turn it off")
    return value


def check_kind_class(kind: Kind, builtin: Mapping[str, type[Kind]]) -> None:
    """Raise ``ValueError`` / ``TypeError`` when a user's kind cannot be logged: a missing, reserved or malformed
    name, a name taken by a built-in kind of another class, a bad interval or layer role, no ``log``."""
    cls = type(kind)
    if not isinstance(kind, Kind):
        raise TypeError(f"kinds must hold kind names or Kind instances, got {kind!r}")
    if not kind.name:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute name = '...' (its tag family)")
    tags.check_kind_name(kind.name)
    if kind.name in builtin and not isinstance(kind, builtin[kind.name]):
        raise ValueError(f"{cls.__name__}.name {kind.name!r} collides with the built-in kind {kind.name!r}; "
                         f"choose another name (built-in kinds: {', '.join(builtin)})")
    check_every(kind.name, kind.every)
    if kind.layer_role not in LAYER_ROLES:
        raise ValueError(f"{cls.__name__}.layer_role must be one of {LAYER_ROLES}, got {kind.layer_role!r}")
    if cls.log is Kind.log:
        raise TypeError(f"{cls.__name__} must define log(self, ctx, out, computed)")
    if not isinstance(kind.label, str):
        raise TypeError(f"{cls.__name__}.label must be a string, got {kind.label!r}")


def unknown_kind(name: object, known: Sequence[str]) -> ValueError:
    """The error for a kind name that names no kind, with close matches."""
    close = difflib.get_close_matches(str(name), list(known), n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(f"unknown kind {name!r}{hint}; expected some of {tuple(known)} or a Kind instance")
