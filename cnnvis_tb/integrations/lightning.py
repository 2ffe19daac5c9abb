"""PyTorch Lightning callback: :class:`CnnVisCallback` runs a :class:`~cnnvis_tb.VisLogger` during ``trainer.fit``.

    from lightning.pytorch import Trainer
    from cnnvis_tb.integrations.lightning import CnnVisCallback

    trainer = Trainer(callbacks=[CnnVisCallback(probe=images, probe_labels=labels, every=200)])
    trainer.fit(model)

Needs the ``lightning`` package (``pip install 'cnnvis_tb[lightning]'``); ``import cnnvis_tb`` does not.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older package name of the same library
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
        from pytorch_lightning.loggers import TensorBoardLogger
    except ImportError as e:
        raise ImportError(
            "cnnvis_tb.integrations.lightning needs PyTorch Lightning: pip install 'cnnvis_tb[lightning]' "
            "(or pip install lightning)"
        ) from e

from cnnvis_tb.distributed import sharding
from cnnvis_tb.logger import VisLogger
from cnnvis_tb.options import check_options
from cnnvis_tb.probe import Probe

__all__ = ["CnnVisCallback"]

# VisLogger's keyword arguments that the callback forwards; model and destination are the callback's to choose.
_OWN = {"self", "model", "log_dir", "writer"}
_PARAMETERS = inspect.signature(VisLogger.__init__).parameters
_FORWARDED = tuple(n for n in _PARAMETERS if n not in _OWN)


class CnnVisCallback(Callback):
    """Log CNN visuals of the ``LightningModule`` being fitted, on a schedule, with a :class:`~cnnvis_tb.VisLogger`.

    Where the events go, in this order of preference:

    1. ``log_dir``, when given: a writer of the callback's own in that folder;
    2. the trainer's first ``TensorBoardLogger``: its ``experiment`` writer, so the visuals sit in the same
       run folder and event stream as the logged metrics (the callback never closes that writer);
    3. otherwise ``trainer.log_dir`` (a ``CSVLogger``'s version folder, or ``default_root_dir`` with
       ``logger=False``): a writer of the callback's own.

    Only global rank zero computes and writes anything; with a fully sharded model (FSDP2 ``fully_shard`` applied in
    ``configure_model``, e.g. with ``ModelParallelStrategy``, or an FSDP1 strategy) every rank builds the
    ``VisLogger`` and joins the gather of the full parameters at each logging step, and rank zero logs on its
    unsharded copy (see :mod:`cnnvis_tb.distributed`). The ``VisLogger`` is built in ``on_fit_start`` (after
    ``configure_model`` and the move to the device) with the ``LightningModule`` as the model, which must
    therefore map images to class scores in its ``forward``. The state at the start of training is logged at
    ``trainer.global_step`` (0 for a fresh run), then ``vis.step(trainer.global_step)`` runs after every training
    batch, so a visual at step ``s`` shows the model after ``s`` optimizer steps, on the same step axis as the
    metrics. The logger is closed at the end of fitting (also when fitting fails).

    Args:
        probe: the images to look at, as for ``VisLogger``: a tensor ``[N, C, H, W]`` as the model sees them, or a
            Dataset / DataLoader whose first ``probe_size`` samples are taken. Read here, once.
        log_dir: a folder for the events instead of the trainer's logger (see above).
        **vis_kwargs: any other keyword argument of :class:`~cnnvis_tb.VisLogger` (``probe_labels``, ``mean``,
            ``std``, ``class_names``, ``layers``, ``every``, ``kinds``, ``strict``, ...), checked here as far as
            that is possible before the model exists: unknown names, kinds, intervals, the probe and its labels,
            ``mean`` / ``std`` and the size options. Layer names are checked when fitting starts.
    """

    def __init__(self, *, probe: Any, log_dir: str | os.PathLike | None = None, **vis_kwargs: Any) -> None:
        super().__init__()
        unknown = [name for name in vis_kwargs if name not in _FORWARDED]
        for name in unknown:
            if name in ("model", "writer"):
                raise TypeError(
                    f"CnnVisCallback chooses {name!r} itself (the LightningModule being fitted; the trainer's "
                    "TensorBoard writer or log_dir); leave it out"
                )
            close = difflib.get_close_matches(name, _FORWARDED, n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise TypeError(f"CnnVisCallback got an unexpected keyword argument {name!r}{hint}; "
                            f"it accepts log_dir and VisLogger's {', '.join(_FORWARDED)}")
        if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir)):
            raise TypeError(f"log_dir must be a folder path (a non-empty str or os.PathLike), got {log_dir!r}")
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        self._probe = _check_options(probe, vis_kwargs)
        self._vis_kwargs = {k: v for k, v in vis_kwargs.items() if k != "probe_labels"}
        self._vis: VisLogger | None = None
        self._last_step: int | None = None  # the last global step seen after a batch, across fits

    @property
    def vis(self) -> VisLogger | None:
        """The running ``VisLogger`` (on global rank zero, and on every rank of a sharded model, between the start
        and the end of fitting), else None."""
        return self._vis

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()  # a previous fit with this callback
        # Decided identically on every rank: trainer.log_dir is a collective call and must run on all of them.
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        log_dir = self._log_dir
        if log_dir is None and tensorboard is None:
            log_dir = trainer.log_dir
        model, sharded = _model_to_log(trainer, pl_module)
        error = None
        if trainer.is_global_zero or sharded:
            # Under FSDP every rank builds it (and joins the gathers); only rank zero gets a destination.
            destination = (log_dir, tensorboard if log_dir is None else None)
            if not trainer.is_global_zero:
                destination = (None, None)
            try:
                self._vis = self._build(model, pl_module, *destination)
            except Exception as e:
                error = e
        # Every rank learns whether rank zero could start, so a bad option stops all ranks together instead of
        # leaving the others waiting forever in their first gradient all-reduce.
        failure = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"CnnVisCallback could not start on global rank 0: {failure}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The model before this fit's first optimizer step, unless an earlier fit ended on this very step.
        if self._vis is not None and trainer.global_step != self._last_step:
            self._vis.step(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last_step = trainer.global_step
        if self._vis is not None:
            self._vis.step(trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------ helpers
    def _build(self, model, pl_module: LightningModule, log_dir: str | None, tensorboard) -> VisLogger:
        if log_dir is not None:
            destination = {"log_dir": log_dir}
        elif tensorboard is None:  # a rank other than zero of a sharded model: it never writes
            destination = {}
        else:
            writer = tensorboard.experiment
            if getattr(writer, "all_writers", True) is None:
                # Closed by the logger's finalize() at the end of an earlier fit; SummaryWriter reopens on use.
                writer._get_file_writer()
            destination = {"writer": writer}
        try:
            return VisLogger(model, **destination, probe=self._probe.images, probe_labels=self._probe.labels,
                             **self._vis_kwargs)
        except ValueError as e:
            if isinstance(e.__cause__, NotImplementedError) and "forward" in str(e.__cause__):
                raise ValueError(
                    f"{type(pl_module).__name__} has no forward(): CnnVisCallback runs the LightningModule on the "
                    "probe, so define forward(images) -> class scores [N, num_classes]"
                ) from e
            raise

    def _close(self) -> None:
        vis, self._vis = self._vis, None
        if vis is not None:
            vis.close()


def _model_to_log(trainer: Trainer, pl_module: LightningModule) -> tuple[Any, bool]:
    """What the VisLogger runs on, and whether it is sharded (decided identically on every rank). FSDP2 shards the
    ``LightningModule`` in place (``fully_shard`` in ``configure_model``), so it stays the model; an FSDP1 strategy
    wraps it, and that wrapper (the strategy's model, holding the outermost flat parameters) is what is gathered."""
    flavour = sharding(pl_module)
    wrapped = getattr(trainer.strategy, "model", None)
    if flavour != "fsdp2" and wrapped is not None and wrapped is not pl_module and sharding(wrapped) == "fsdp1":
        return wrapped, True
    return pl_module, flavour is not None


def _check_options(probe: Any, options: dict[str, Any]) -> Probe:
    """Check what can be checked without the model (VisLogger's own checks); return the probe, read once."""
    model_free = inspect.signature(check_options).parameters
    return check_options(probe=probe, **{k: v for k, v in options.items() if k in model_free}).probe
