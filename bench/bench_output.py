"""Bytes written per logging step at the defaults: event-file growth of one ``vis.log_now(step)``.

All default kinds at one step (what the default schedule writes at step 0 and every 1000 steps), after one
training step so parameter gradients exist (their histograms are written too), measured as the growth of
the run folder on disk (events are flushed at the end of each logging step):

* the demo ``SmallCNN`` with an 8-image 32 px probe;
* ResNet-18 (``weights=None``) with an 8-image 224 px probe (shape images).

The layer table, written once at the first logging step, is left out of the figure; the bytes of each kind,
read back from the event file, are shown as context. ResNet-18's activation-maximization pictures are
optimized with fewer steps than the default to keep the script short (the optimization steps change what
the pictures look like, hence how well they compress, but not their size in pixels); the count is printed.

    python bench/bench_output.py [--quick]
"""

from __future__ import annotations

import glob
import os
import tempfile

import torch
import torchvision
from benchutil import Row, check, finish, info, parse_args, shapes_probe
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from torch import nn

from cnnvis_tb import VisLogger, tags
from cnnvis_tb.demo import CLASSES, MEAN, STD, SmallCNN
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS

STEP = 1000  # a step at which the default schedule logs every default kind


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def bytes_by_kind(log_dir: str, step: int) -> dict[str, int]:
    """On-disk bytes of the events at ``step``, by the kind in their ``cnnvis/<kind>/...`` tag.

    Each record costs its serialized event plus the 16 bytes of TFRecord framing.
    """
    sizes: dict[str, int] = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for record in RawEventFileLoader(path).Load():
            event = event_pb2.Event.FromString(record)
            if event.step != step or not event.HasField("summary"):
                continue
            for value in event.summary.value:
                parts = tags.parse_tag(value.tag)
                kind = parts.kind if parts else "other"
                sizes[kind] = sizes.get(kind, 0) + len(record) + 16
    return sizes


def one_training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.eval()


def bytes_per_step(name: str, model: nn.Module, size: int, limit_mb: float | None, actmax_steps: int,
                   class_names=None) -> list[Row]:
    """Folder growth of one all-default-kinds logging step, and its bytes by kind."""
    probe, labels = shapes_probe(8, size)
    x, y = shapes_probe(8, size, seed=7)
    one_training_step(model, x, y)
    with tempfile.TemporaryDirectory(prefix="bench_output_") as log_dir:
        vis = VisLogger(model, log_dir, probe=probe, probe_labels=labels, mean=MEAN, std=STD,
                        class_names=class_names, actmax_steps=actmax_steps, strict=True)
        vis.log_now(0, kinds=["kernels"])  # the first logging step also writes the layer table (once)
        before = folder_bytes(log_dir)
        vis.log_now(STEP)
        total = folder_bytes(log_dir) - before
        vis.close()
        per_kind = bytes_by_kind(log_dir, STEP)
        table = bytes_by_kind(log_dir, 0).get("summary", 0)
    steps_note = f"actmax {actmax_steps} steps" if actmax_steps != DEFAULT_STEPS else "all defaults"
    figure = f"{name}: bytes per logging step, all default kinds ({steps_note})"
    mb = total / 1e6
    value_row = check(figure, mb, "<", limit_mb, fmt="{:.2f}", unit=" MB") if limit_mb else info(figure, f"{mb:.2f} MB")
    return [
        value_row,
        info(f"{name}: by kind", ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in sorted(per_kind.items()))
             + f"; layer table (once) {table / 1e3:.0f} kB"),
    ]


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    torch.manual_seed(0)
    print("SmallCNN ...", flush=True)
    rows = bytes_per_step("SmallCNN 8×32²", SmallCNN(), 32, None, DEFAULT_STEPS, CLASSES)
    print("ResNet-18 ...", flush=True)
    rows += bytes_per_step("ResNet-18 8×224²", torchvision.models.resnet18(weights=None), 224, 2.0,
                           2 if args.quick else 12)
    return finish("Bytes written per logging step", rows, args)


if __name__ == "__main__":
    main()
