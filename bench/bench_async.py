"""Asynchronous logging: what a logging step blocks the training thread for, and a whole run, async on and off.

(a) Training-thread blocking time of one logging step with features + Grad-CAM (default CAM methods, Grad-CAM and
    Grad-CAM++, default metrics with deletion / insertion at every step, and with ``cam_metrics="cheap"``),
    ``vis.step(s)`` with ``async_logging`` off and on, as a multiple of the shared probe pass alone (the one forward
    and ``autograd.grad`` those kinds need), on the demo CNN (8-image 32 px probe) and ResNet-18 (8 × 224²).
    Interleaved round by round; with async on the worker's time is waited for outside the timed call (and reported
    apart).
(b) Whole-run overhead at the default schedule on the demo training (as ``bench_step.py`` (b)): runs without the
    logger, with it synchronous and with it asynchronous advance in turns of 25 steps, order rotating; a run waits
    for its worker at the end of its turn (``bench_step.interleave``), so the worker's work is paid by its run.
    Three repetitions of the three runs; the median overhead and the range are printed.
(c) The same over 1,001 steps (so activation maximization, at its default interval of 1,000, runs once), async on:
    without the logger; with every kind but the two optimizing ones (actmax, deepdream) every 50 steps; at the
    default schedule with ``actmax_background=True``.

    python bench/bench_async.py [--quick]
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time

import torch
import torchvision
from bench_step import BLOCK, TrainingRun, interleave
from benchutil import Row, check, finish, info, parse_args, shapes_probe

from cnnvis_tb import VisLogger
from cnnvis_tb.demo import MEAN, STD, ShapesDataset, SmallCNN
from cnnvis_tb.kinds import GradCam, Needs
from cnnvis_tb.safety import preserved


def blocking(name: str, model: torch.nn.Module, size: int, rounds: int) -> list[Row]:
    """(a) for one model, with the default ``cam_metrics`` (with async on, those that run the model run on the
    worker, on a frozen copy) and with ``cam_metrics="cheap"``."""
    images, labels = shapes_probe(8, size)
    dirs = [tempfile.TemporaryDirectory(prefix="bench_async_") for _ in range(4)]
    common = dict(probe=images, probe_labels=labels, mean=MEAN, std=STD, every=1, strict=True)

    def kinds(metrics: bool | str) -> list:  # every timed step a full one: deletion / insertion too (at 224 px
        return ["features", GradCam(metrics=metrics, deletion_every=1)]  # they run at every 4th step by default)

    loggers = {
        "sync, cheap metrics": VisLogger(model, dirs[2].name, kinds=kinds("cheap"), async_logging=False, **common),
        "async, cheap metrics": VisLogger(model, dirs[3].name, kinds=kinds("cheap"), async_logging=True, **common),
        "sync": VisLogger(model, dirs[0].name, kinds=kinds(True), async_logging=False, **common),
        "async": VisLogger(model, dirs[1].name, kinds=kinds(True), async_logging=True, **common),
    }
    ref = loggers["sync, cheap metrics"]
    needs = functools.reduce(lambda a, b: a | b, (k.needs() for k in ref._kinds), Needs())

    def probe_pass() -> None:
        with preserved(ref._net):
            ref._probe_pass(needs)

    step = iter(range(1 << 30))
    for vis in loggers.values():  # first-call costs (writer, tables) out of the way
        vis.step(next(step))
        vis.wait()
    fns = {"probe pass": probe_pass, **{k: (lambda v=v: v.step(next(step))) for k, v in loggers.items()}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    worker: dict[str, list[float]] = {k: [] for k in loggers if k.startswith("async")}
    names = list(fns)
    for r in range(rounds):
        for key in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
            if key in worker:  # the worker's share, outside the timed call
                loggers[key].wait()
                worker[key].append(sum(loggers[key].last_worker_times.values()))
    for vis in loggers.values():
        vis.close()
    for d in dirs:
        d.cleanup()

    def ratio(key: str) -> float:
        return statistics.median(a / b for a, b in zip(times[key], times["probe pass"], strict=True))

    rows = [info(f"{name}: the probe pass alone (features + Grad-CAM needs), median",
                 f"{statistics.median(times['probe pass']) * 1e3:.1f} ms")]
    for key in loggers:
        figure = f"{name}: training-thread blocking of one features + Grad-CAM logging step ({key}) / probe pass"
        value = ratio(key)
        rows.append(check(figure, value, "<=", 1.3, fmt="{:.2f}", unit="×") if key.startswith("async")
                    else info(figure, f"{value:.2f}×"))
    for key, values in worker.items():
        rows.append(info(f"{name}: worker time of that step ({key}), median",
                         f"{statistics.median(values) * 1e3:.1f} ms"))
    return rows


def _runs(steps: int, options: dict[str, dict]) -> tuple[dict[str, TrainingRun], bool]:
    """Train one run without the logger and one per ``options`` (VisLogger keywords), interleaved in turns
    (``bench_step.interleave``); returns them by name (``"plain"`` first) and whether their final parameters agree."""
    train, test = ShapesDataset(4096, 32, seed=0), ShapesDataset(512, 32, seed=10_000)
    runs = {"plain": TrainingRun(steps, False, train, test),
            **{name: TrainingRun(steps, True, train, test, vis_options=o) for name, o in options.items()}}
    interleave(list(runs.values()), steps)
    finals = [run.finish() for run in runs.values()]
    identical = all(torch.equal(a, b) for other in finals[1:] for a, b in zip(finals[0], other, strict=True))
    return runs, identical


def _overhead(runs: dict[str, TrainingRun], name: str) -> float:
    return 100 * (runs[name].seconds / runs["plain"].seconds - 1)


def _seconds(runs: dict[str, TrainingRun]) -> str:
    return " / ".join(f"{run.seconds:.1f} s" for run in runs.values())


def run_overhead(steps: int, repeats: int = 3) -> list[Row]:
    """(b) Whole-run overhead at the default schedule, async off and on: the three interleaved runs ``repeats``
    times over (the overhead of one repetition moves by a few points on a busy 2-core machine); the median
    repetition's figures, and the range."""
    import torch.utils.tensorboard  # noqa: F401  (a once-per-process cost, as in bench_step)

    seen = {"sync": [], "async": []}
    times, identical = [], True
    for _ in range(repeats):
        runs, same = _runs(steps, {"sync": {"async_logging": False}, "async": {"async_logging": True}})
        identical &= same
        times.append(_seconds(runs))
        for name in seen:
            seen[name].append(_overhead(runs, name))
    spread = {name: f"median of {repeats}, range {min(v):.1f} to {max(v):.1f} %" for name, v in seen.items()}
    return [
        info(f"demo run, {steps} steps: without / sync / async VisLogger, each repetition", "; ".join(times)),
        info(f"demo run overhead at defaults, async_logging=False ({steps} steps, turns of {BLOCK}; "
             f"{spread['sync']})", f"{statistics.median(seen['sync']):.1f} %"),
        check(f"demo run overhead at defaults, async_logging=True ({steps} steps, turns of {BLOCK}; "
              f"{spread['async']})", statistics.median(seen["async"]), "<=", 1, fmt="{:.1f}", unit=" %"),
        Row("final parameters without / sync / async bit-identical", "yes" if identical else "no", "yes", identical),
    ]


EVERY_50 = ["gradcam", "features", "kernels", "histograms", "health", "saliency"]


def run_overhead_more(steps: int) -> list[Row]:
    """(c) Whole-run overhead, async on: every kind but actmax and deepdream every 50 steps; the default schedule
    with activation maximization on its snapshot path (it runs at step 1,000, so the run has 1,001 steps)."""
    runs, identical = _runs(steps, {"every 50": {"kinds": EVERY_50, "every": 50},
                                    "actmax": {"actmax_background": True}})
    return [
        info(f"demo run, {steps} steps: without / every kind every 50 / defaults + background actmax",
             _seconds(runs)),
        check(f"demo run overhead, async, {', '.join(EVERY_50)} every 50 steps ({steps} steps, turns of {BLOCK})",
              _overhead(runs, "every 50"), "<=", 3, fmt="{:.1f}", unit=" %"),
        check(f"demo run overhead, async, defaults with actmax_background=True (actmax at step 1,000; {steps} steps)",
              _overhead(runs, "actmax"), "<=", 2, fmt="{:.1f}", unit=" %"),
        Row("final parameters of those runs bit-identical", "yes" if identical else "no", "yes", identical),
    ]


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print("(a) blocking time of a features + Grad-CAM logging step: demo CNN ...", flush=True)
    torch.manual_seed(0)
    rows = blocking("SmallCNN 32 px", SmallCNN(), 32, rounds=4 if args.quick else 12)
    print("(a) ... ResNet-18 ...", flush=True)
    torch.manual_seed(0)
    rows += blocking("ResNet-18 224 px", torchvision.models.resnet18(weights=None), 224, rounds=2 if args.quick else 5)
    steps = 150 if args.quick else 600
    print(f"(b) whole demo run, {steps} steps, without / sync / async interleaved ...", flush=True)
    rows += run_overhead(steps, repeats=1 if args.quick else 3)
    print("(c) whole demo run, 1,001 steps: every kind every 50 steps; actmax in the background ...", flush=True)
    rows += run_overhead_more(201 if args.quick else 1001)
    return finish("Asynchronous logging: training-thread cost", rows, args)


if __name__ == "__main__":
    main()
