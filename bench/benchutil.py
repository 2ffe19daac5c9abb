"""Shared helpers of the benchmark scripts: interleaved timing, result rows and tables, the demo model.

Every figure the scripts report is a ratio of times measured side by side in one process: the callables
being compared run one after the other in each round (the order rotates from round to round), the ratio
is taken within each round, and the median over rounds is reported. Absolute times are printed only as
context; they depend on the machine and on whatever else it is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cnnvis_tb.demo import ShapesDataset, SmallCNN


@dataclass
class Row:
    """One reported figure. ``passed`` is None for figures that have no target (context only)."""

    figure: str
    value: str
    target: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


_OPS = {"<=": ("≤", float.__le__), "<": ("<", float.__lt__), ">=": ("≥", float.__ge__), ">": (">", float.__gt__)}


def check(figure: str, value: float, op: str, limit: float, *, fmt: str = "{:.2f}", unit: str = "") -> Row:
    """A row with a target ``value <op> limit`` (``op`` one of ``<= < >= >``), judged now."""
    symbol, compare = _OPS[op]
    return Row(figure, fmt.format(value) + unit, f"{symbol} {limit:g}{unit}", compare(float(value), float(limit)))


def info(figure: str, value: str) -> Row:
    """A context row without a target."""
    return Row(figure, value)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every benchmark script takes: ``--quick`` and ``--json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller runs (a smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the result rows to this JSON file (used by run_all)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def time_call(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable over ``rounds`` rounds; every callable runs once per round.

    The order of the callables is rotated every round so none always runs first (or right after the
    most expensive one). ``warmup`` untimed rounds come first.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_call(fns[name]))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][i] / times[den][i]``."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ms"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """Print ``rows`` as a Markdown table under ``title``."""
    print(f"\n### {title}\n")
    print(markdown_table(rows))
    print(flush=True)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| figure | value | target | result |", "| --- | ---: | ---: | :---: |"]
    lines += [f"| {r.figure} | {r.value} | {r.target} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def finish(title: str, rows: Sequence[Row], args: argparse.Namespace) -> list[Row]:
    """Print the table (and write the JSON file when asked); returns the rows."""
    print_table(title, rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return list(rows)


def load_rows(path: str) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        return [Row(**r) for r in json.load(f)]


def machine() -> dict[str, str]:
    """CPU model, cores, torch version and threads of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "load average (1 min)": f"{os.getloadavg()[0]:.1f}",
    }


def hook_count(model: nn.Module) -> int:
    """Forward / backward hooks on every submodule of ``model`` plus the global module hooks."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    total = sum(len(getattr(m, kind)) for m in model.modules() for kind in kinds)
    module_mod = nn.modules.module
    globals_ = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")
    return total + sum(len(getattr(module_mod, g, {})) for g in globals_)


def train_demo_cnn(steps: int = 150, *, seed: int = 0, batch: int = 64, lr: float = 0.05) -> SmallCNN:
    """The demo CNN after ``steps`` SGD steps on ``ShapesDataset`` (batches drawn with our own generator)."""
    torch.manual_seed(seed)
    data = ShapesDataset(4096, 32, seed=seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        loss = loss_fn(model(data.images[idx]), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def shapes_probe(count: int, size: int, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` held-out normalized shape images of ``size`` px and their labels."""
    data = ShapesDataset(count, size, seed=seed)
    return data.images, data.labels
