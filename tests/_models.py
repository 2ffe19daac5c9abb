"""Small models, probes and event-file readers shared by the tests (imported as a plain module)."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU ×3 (one grouped), dropout, global pooling, linear: every training-mode effect in a few ms."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width * 2, width * 2, 3, padding=1, groups=2),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def make_batch(seed: int, n: int = 8, c: int = 3, h: int = 16, w: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randint(classes, (n,), generator=g)


def read_events(log_dir) -> EventAccumulator:
    """Everything in a run folder, read by TensorBoard's own loader with no sampling limit."""
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def decode_png(encoded: bytes) -> np.ndarray:
    """PNG bytes → ``[H, W, 3]`` uint8."""
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def image_at(acc: EventAccumulator, tag: str, step: int | None = None) -> np.ndarray:
    events = acc.Images(tag)
    event = events[-1] if step is None else next(e for e in events if e.step == step)
    return decode_png(event.encoded_image_string)


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """``(step, text)`` of every text summary logged under ``tag`` (``add_text``'s ``/text_summary`` included)."""
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag)]


def tiny_logger(log_dir, model: nn.Module | None = None, *, n: int = 4, **kwargs):
    """A strict VisLogger on TinyCNN (seed 0) with a labelled probe of ``n`` images and 2 actmax steps."""
    from cnnvis_tb import VisLogger

    torch.manual_seed(0)
    model = model or TinyCNN()
    probe, labels = make_batch(2, n=n)
    kwargs.setdefault("strict", True)
    kwargs.setdefault("actmax_steps", 2)
    return VisLogger(model, log_dir, probe=probe, probe_labels=labels, **kwargs)


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Number of hooks of every kind on every submodule (zeros are kept, so dicts compare fully)."""
    counts = {}
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            counts[f"{name}:{attr}"] = len(getattr(m, attr, {}))
    for name, p in model.named_parameters():
        counts[f"{name}:tensor_hooks"] = len(p._backward_hooks or {})
    return counts


class RunFailed(Exception):
    """A distributed run exited with an error or did not finish in time."""


def finish_ranks(procs: list[subprocess.Popen], out: Path, *, timeout: float) -> list[dict]:
    """Wait for the rank processes of a run; returns each rank's report (``out/rank<r>.json``). Raises RunFailed
    on an error exit or a timeout (all killed), with the end of every rank's output."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- rank {r} ---\n{p.communicate()[0][-3000:]}" for r, p in enumerate(procs))
        raise RunFailed(f"the run did not finish within {timeout} s (deadlock?)\n{logs}") from None
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-3000:]}"
                         for r, (p, o) in enumerate(zip(procs, outputs, strict=True)))
        raise RunFailed(f"the run failed\n{logs}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(procs))]


def train_demo_cnn(steps: int = 100, size: int = 32) -> nn.Module:
    """The demo CNN after ``steps`` SGD steps on generated shapes (about 5 s for 100 on one thread), in eval mode.
    Trained on one intra-op thread: on 2 busy cores that is several times faster for so small a model."""
    from cnnvis_tb.demo import ShapesDataset, SmallCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = ShapesDataset(2048, size, seed=0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(len(data), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
