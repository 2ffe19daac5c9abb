"""Long runs: memory and event-file size over many logging steps of the demo model.

    python bench/bench_longrun.py            # 1,000 logging steps (several minutes on 2 cores)
    python bench/bench_longrun.py --steps 200
    python bench/bench_longrun.py --sync     # with async_logging=False

Logs kernels, features, Grad-CAM (with its default metrics, which run on the worker's frozen copy of the model),
histograms and health at every step of a demo CNN that keeps training, with asynchronous logging (the default),
and reports: the process's resident memory, live Python objects and live tensors growth from the first tenth of the
run to the end, and the event file's bytes per logging step over the first and the second half (equal halves mean
the size is linear in steps).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.demo import ShapesDataset, SmallCNN


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def events_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("events.out.tfevents.*"))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--sync", action="store_true", help="async_logging=False")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = ShapesDataset(1024, 32, seed=0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        vis = VisLogger(model, folder, probe=data, mean=data.mean, std=data.std, every=1,
                        kinds=["kernels", "features", "gradcam", "histograms", "health"],
                        async_logging=not args.sync)
        marks: dict[int, tuple[float, int, int]] = {}
        first_mark = max(1, args.steps // 10)
        start = time.perf_counter()
        for step in range(args.steps + 1):
            idx = torch.arange(step * 32, step * 32 + 32) % len(data)
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            vis.step(step)
            if step in (first_mark, args.steps // 2, args.steps):
                vis.wait()  # the step's work is done (and its memory released) before the count
                gc.collect()
                objects = gc.get_objects()
                tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
                marks[step] = (rss_mb(), len(objects), tensors, events_bytes(folder))
        elapsed = time.perf_counter() - start
        vis.close()
    (rss0, heap0, t0, size0), (_, _, _, size_half), (rss1, heap1, t1, size1) = (marks[k] for k in sorted(marks))
    half = args.steps // 2
    figures = {
        "logging steps": args.steps,
        "async_logging": float(not args.sync),
        f"RSS growth (MB), step {first_mark} → {args.steps}": rss1 - rss0,
        "live Python objects growth": heap1 - heap0,
        "live tensors growth": t1 - t0,
        f"live tensors at step {first_mark}": t0,
        "event bytes / logging step, 1st half": (size_half - size0) / max(1, half - first_mark),
        "event bytes / logging step, 2nd half": (size1 - size_half) / max(1, args.steps - half),
        "seconds": elapsed,
    }
    ratio = figures["event bytes / logging step, 2nd half"] / figures["event bytes / logging step, 1st half"]
    figures["2nd-half / 1st-half bytes per step (1.0 = linear)"] = ratio
    for name, value in figures.items():
        print(f"{name:55s} {value:12.2f}")
    return figures


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
