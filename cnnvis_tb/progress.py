"""Helpers for training scripts (the examples use them): a progress bar that shows the logging steps, and a check
that a run folder is fresh."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["TrainingBar", "holds_events", "fresh_run_dir", "show_progress_logs"]


def holds_events(log_dir: str | os.PathLike) -> bool:
    """Whether ``log_dir`` already holds TensorBoard event files (a second training there would mix two runs)."""
    path = Path(log_dir)
    return path.is_dir() and any(path.glob("events.out.tfevents.*"))


def fresh_run_dir(log_dir: str | os.PathLike) -> Path:
    """``log_dir`` if it holds no events yet, else the first of ``log_dir-2``, ``log_dir-3``, ... that holds none."""
    path = Path(log_dir)
    if not holds_events(path):
        return path
    n = 2
    while holds_events(path.with_name(f"{path.name}-{n}")):
        n += 1
    return path.with_name(f"{path.name}-{n}")


class _AboveTheBar(logging.StreamHandler):
    """Writes each message on a line of its own above any tqdm bar (``tqdm.write``), on a terminal and in a log
    file alike: a plain stream handler would append it to the bar's unfinished line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def show_progress_logs(level: int = logging.INFO) -> None:
    """Print cnnvis_tb's progress messages (long logging work, at INFO) on stderr, as the examples do, each on its
    own line above the progress bar."""
    logger = logging.getLogger("cnnvis_tb")
    if not logger.handlers:
        handler = _AboveTheBar()
        handler.setFormatter(logging.Formatter("cnnvis_tb: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


class TrainingBar:
    """A tqdm bar over the training steps whose postfix shows the loss and, at a logging step, what was logged and
    how long each kind took (``logged gradcam 31ms features 12ms``; under asynchronous logging the training thread's
    time, then the worker's: ``logged @200 gradcam 1ms features 0ms; rendered gradcam 52ms features 20ms``). On a
    terminal it redraws in place; in a log file (no TTY) it prints a line at most every ``mininterval`` seconds.

    ``bar = TrainingBar(steps, vis)``; in the loop ``bar.step(step, loss, logged=vis.step(step))``; ``bar.close()``.
    """

    def __init__(self, total: int, vis=None, *, desc: str = "training", mininterval: float | None = None) -> None:
        import sys

        from tqdm.auto import tqdm

        if mininterval is None:
            mininterval = 0.1 if sys.stderr.isatty() else 30.0
        self.vis = vis
        self.bar = tqdm(total=total, desc=desc, unit="step", mininterval=mininterval, dynamic_ncols=True)
        self.logged = ""
        self.rendered = ""  # the worker's times of the latest logging step, once it finished them
        self._logged_step: int | None = None

    def step(self, step: int, loss: float | None = None, *, logged: bool = False) -> None:
        """Advance by one training step; ``logged``: whether ``vis.step`` logged at this step. With asynchronous
        logging the times are the training thread's, and, once the worker has finished that step, its own
        (``rendered gradcam 52ms ...``)."""
        vis = self.vis
        if logged and vis is not None:
            self.logged = f"@{step} " + " ".join(f"{k} {t * 1000:.0f}ms" for k, t in vis.last_times.items())
            self.rendered, self._logged_step = "", step
        worker = getattr(vis, "last_worker_times", None)
        if not self.rendered and worker and getattr(vis, "last_worker_step", None) == self._logged_step:
            self.rendered = "rendered " + " ".join(f"{k} {t * 1000:.0f}ms" for k, t in worker.items())
        postfix = {} if loss is None else {"loss": f"{loss:.3f}"}
        if self.logged:
            postfix["logged"] = self.logged + (f"; {self.rendered}" if self.rendered else "")
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
