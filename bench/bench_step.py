"""What ``VisLogger`` costs a training run: idle ``step()`` calls, a whole run, one logging step per kind.

(a) ``vis.step(s)`` on steps where nothing is due (default schedule): median over 10,000 calls, in µs,
    and a check that no hook is left on the model afterwards.
(b) The demo training of ``examples/train_shapes.py`` (SmallCNN, ShapesDataset, batch 64, 32 px, SGD with
    OneCycleLR; 600 steps) with a ``VisLogger`` at its default schedule (``every=None``) and without, same
    seeds, alternated in this one process: the runs advance in turns of 25 steps (the order rotating every turn),
    so slow phases of a busy machine hit all alike; with asynchronous logging (the default) a run waits for its
    worker at the end of its turn, so the worker's work is paid by its own run (:func:`interleave`). Logger
    construction and ``close()`` count. A third run adds activation maximization at step 0, which the default
    schedule leaves out (it starts at its interval). TensorBoard's writer module is imported before the runs
    (a once-per-process cost, printed apart). The final parameters of all runs must be bit-identical.
(c) One logging step of each kind alone (``vis.log_now(step, kinds=[kind])``) as a multiple of one
    training step, interleaved round by round: the demo model (8-image 32 px probe; unit: a batch-64 step)
    and ResNet-18 (8-image 224 px probe; unit: a batch-8 step). ResNet-18's activation maximization is too
    slow to repeat here: it is timed with 2 and 6 optimization steps and extrapolated linearly to the
    logger's default steps (the cost of one optimization step is constant). Saliency is timed with each
    method: the default (vanilla, from the shared forward pass), guided backprop and SmoothGrad. The opt-in kinds
    (saliency, DeepDream) are marked so; DeepDream runs at its default 3 octaves × 10 steps.

    python bench/bench_step.py [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torchvision
from benchutil import Row, check, finish, hook_count, info, interleaved, median_ms, parse_args, shapes_probe
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.demo import CLASSES, MEAN, STD, ShapesDataset, SmallCNN
from cnnvis_tb.kinds import ALL_KINDS, BUILTIN, DEFAULT_EVERY, DEFAULT_KINDS
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS

ACTMAX_STEPS = DEFAULT_STEPS  # VisLogger's default actmax_steps


def idle_steps(calls: int) -> list[Row]:
    """(a) Median time of ``vis.step`` on steps where no kind is due, and hooks left behind."""
    model = SmallCNN()
    images, labels = shapes_probe(8, 32)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as log_dir:
        vis = VisLogger(model, log_dir, probe=images, probe_labels=labels, mean=MEAN, std=STD)
        steps = [s for s in range(1, 2 * calls) if not vis.due(s)][:calls]
        hooks_before = hook_count(model)
        times, logged = [], 0
        for s in steps:
            start = time.perf_counter_ns()
            logged += vis.step(s)
            times.append(time.perf_counter_ns() - start)
        hooks_after = hook_count(model)
        vis.close()
    times_us = sorted(t / 1e3 for t in times)
    return [
        check(f"idle vis.step(): median of {len(times)} calls", statistics.median(times_us), "<", 20,
              fmt="{:.2f}", unit=" µs"),
        info("idle vis.step(): 99th percentile", f"{times_us[int(0.99 * len(times_us))]:.2f} µs"),
        check(f"hooks on the model after the idle calls (before: {hooks_before}; logged: {logged})", hooks_after,
              "<=", 0, fmt="{:d}"),
    ]


class TrainingRun:
    """The loop of examples/train_shapes.py, advanced one step at a time so two runs can be interleaved.

    Each run keeps its own copy of the global RNG state (dropout draws from it) and its DataLoader has its
    own generator, so interleaving two runs changes nothing about either. Only the run's own work is timed:
    logger construction, each step (batch, forward, backward, optimizer, scheduler, ``vis.step`` and, with
    asynchronous logging, the wait for its worker), ``close()``.
    """

    def __init__(self, steps: int, with_vis: bool, train: ShapesDataset, test: ShapesDataset, seed: int = 0,
                 extra_at_zero: tuple[str, ...] = (), vis_options: dict | None = None):
        torch.manual_seed(seed)
        self.model = SmallCNN()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=0.05, total_steps=steps)
        self.loss_fn = nn.CrossEntropyLoss()
        self.loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True,
                                                  generator=torch.Generator().manual_seed(seed))
        self.batches = self._batches()
        self.rng = torch.get_rng_state()
        self.seconds, self.step = 0.0, 0
        self.log_dir = tempfile.TemporaryDirectory(prefix="bench_run_")
        self.vis = None
        self.extra_at_zero = extra_at_zero
        if with_vis:
            self._timed(lambda: setattr(self, "vis", VisLogger(
                self.model, self.log_dir.name, probe=test, probe_size=8, mean=train.mean, std=train.std,
                class_names=CLASSES, **(vis_options or {}))))

    def _batches(self):
        while True:
            yield from self.loader

    def _timed(self, fn: Callable[[], object]) -> None:
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        fn()
        self.seconds += time.perf_counter() - start
        self.rng = torch.get_rng_state()

    def _train_step(self) -> None:
        x, y = next(self.batches)
        self.model.train()
        loss = self.loss_fn(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.vis:
            self.vis.step(self.step)
            if self.step == 0 and self.extra_at_zero:
                self.vis.log_now(0, kinds=list(self.extra_at_zero))

        self.step += 1

    def advance(self) -> None:
        self._timed(self._train_step)

    def settle(self) -> None:
        """Wait for the logger's asynchronous worker, in this run's own time: called before another run takes
        its turn, so what the worker still has to do is paid by its own run, never during another's steps."""
        if self.vis:
            self._timed(self.vis.wait)


    def finish(self) -> list[torch.Tensor]:
        if self.vis:
            self._timed(self.vis.close)
        self.log_dir.cleanup()
        return [t.detach().clone() for t in self.model.state_dict().values()]


#: Steps a run advances before the next one takes its turn (see :func:`interleave`).
BLOCK = 25


def interleave(runs: list[TrainingRun], steps: int, block: int = BLOCK) -> None:
    """Advance ``runs`` in turns of ``block`` steps, the order rotating every turn, so all see the same machine
    load. At the end of its turn a run waits for its logger's worker (:meth:`TrainingRun.settle`): within the
    turn the worker overlaps the run's own training, as in a real run, and nothing of it runs in another's turn."""
    for turn, start in enumerate(range(0, steps, block)):
        k = turn % len(runs)
        for run in runs[k:] + runs[:k]:
            for _ in range(start, min(steps, start + block)):
                run.advance()
            run.settle()


def import_seconds() -> float:
    """One-time cost of importing TensorBoard's event writer (what any ``SummaryWriter`` user pays once per
    process), measured in a fresh interpreter that has imported torch already."""
    code = ("import time, torch; t = time.perf_counter(); import torch.utils.tensorboard; "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_overhead(steps: int) -> list[Row]:
    """(b) Whole-run overhead of the default schedule: the runs without and with the logger advance in lockstep,
    in turns of :data:`BLOCK` steps (:func:`interleave`), so all see the same machine load. A third run also logs
    activation maximization at step 0 (which the default schedule leaves out), to show what that would cost.
    TensorBoard's writer module is imported before the runs start: a once-per-process cost, reported apart."""
    import torch.utils.tensorboard  # noqa: F401  (see import_seconds)

    train, test = ShapesDataset(4096, 32, seed=0), ShapesDataset(512, 32, seed=10_000)
    plain = TrainingRun(steps, False, train, test)
    logged = TrainingRun(steps, True, train, test)
    actmax_at_zero = TrainingRun(steps, True, train, test, extra_at_zero=("actmax",))
    runs = [plain, logged, actmax_at_zero]
    interleave(runs, steps)
    finals = [run.finish() for run in runs]
    identical = all(torch.equal(a, b) for other in finals[1:] for a, b in zip(finals[0], other, strict=True))
    due = {k: len(range(0 if BUILTIN[k].at_step_zero else n, steps, n)) for k, n in DEFAULT_EVERY.items()
           if k in DEFAULT_KINDS}
    overhead = 100 * (logged.seconds / plain.seconds - 1)
    return [
        info(f"demo run, {steps} steps: without / with VisLogger", f"{plain.seconds:.1f} s / {logged.seconds:.1f} s"),
        info("logs in the run at the default schedule", ", ".join(f"{k} {n}" for k, n in due.items())),
        check(f"demo run overhead of VisLogger at defaults ({steps} steps, runs interleaved in turns of {BLOCK})",
              overhead, "<=", 3, fmt="{:.1f}", unit=" %"),
        info("the same run with activation maximization also at step 0 (not in the default schedule)",
             f"{100 * (actmax_at_zero.seconds / plain.seconds - 1):.1f} %"),
        info("one-time import of TensorBoard's event writer (once per process, outside the runs)",
             f"{import_seconds():.2f} s"),
        Row("final parameters with and without the logger bit-identical", "yes" if identical else "no", "yes",
            identical),
    ]


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return train_step


def kind_costs(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], probe_size: int,
               rounds: int, extrapolate_actmax: bool) -> list[Row]:
    """(c) One logging step per kind / one training step, median over interleaved rounds."""
    x, y = batch
    images, labels = shapes_probe(probe_size, x.shape[-1])
    train_step = train_step_fn(model, x, y)
    train_step()  # so gradients exist (the histograms include them)
    log_dirs = [tempfile.TemporaryDirectory(prefix="bench_kinds_") for _ in range(5)]
    common = dict(probe=images, probe_labels=labels, mean=MEAN, std=STD, kinds=ALL_KINDS, strict=True)
    vis = VisLogger(model, log_dirs[0].name, **common)
    counter = iter(range(1, 1 << 30))
    fns: dict[str, Callable[[], object]] = {"train step": train_step}
    kinds = [k for k in ALL_KINDS if not (extrapolate_actmax and k == "actmax")]
    for kind in kinds:
        fns[kind] = lambda kind=kind: vis.log_now(next(counter), kinds=[kind])
    short = {}
    if extrapolate_actmax:
        short = {n: VisLogger(model, log_dirs[i].name, actmax_steps=n, **common) for i, n in ((1, 2), (2, 6))}
        for n, v in short.items():
            fns[f"actmax@{n}"] = lambda v=v: v.log_now(next(counter), kinds=["actmax"])
    methods = {m: VisLogger(model, log_dirs[i].name, saliency_methods=m, **common)
               for i, m in ((3, "guided"), (4, "smoothgrad"))}  # the saliency methods that cost passes of their own
    for m, v in methods.items():
        fns[f"saliency:{m}"] = lambda v=v: v.log_now(next(counter), kinds=["saliency"])
    for v in (vis, *short.values(), *methods.values()):
        v.log_now(0, kinds=["kernels"])  # first-call costs (writer, layer table) out of the way
    times = interleaved(fns, rounds=rounds, warmup=0 if extrapolate_actmax else 1)
    for v in (vis, *short.values(), *methods.values()):
        v.close()
    for d in log_dirs:
        d.cleanup()

    if extrapolate_actmax:
        t2, t6 = times.pop("actmax@2"), times.pop("actmax@6")
        times["actmax"] = [a + (b - a) * (ACTMAX_STEPS - 2) / 4 for a, b in zip(t2, t6, strict=True)]
    rows = [info(f"{name}: one training step (batch {len(x)}), median", median_ms(times["train step"]))]
    def per_train_step(key: str) -> float:
        return statistics.median(t / u for t, u in zip(times[key], times["train step"], strict=True))

    for kind in ALL_KINDS:
        ratio = per_train_step(kind)
        note = "" if kind in DEFAULT_KINDS else " (opt-in)"
        if kind == "actmax" and extrapolate_actmax:
            note = f" ({ACTMAX_STEPS} steps, extrapolated from 2 and 6)"
        rows.append(info(f"{name}: one '{kind}' logging step{note} / one training step", f"{ratio:.1f}×"))
        if kind == "saliency":
            for m in methods:
                rows.append(info(f"{name}: one 'saliency' logging step, saliency_methods='{m}' / one training step",
                                 f"{per_train_step(f'saliency:{m}'):.1f}×"))
    return rows


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print("(a) idle steps ...", flush=True)
    rows = idle_steps(10_000)
    steps = 150 if args.quick else 600
    print(f"(b) whole demo run, {steps} steps, with and without the logger interleaved ...", flush=True)
    rows += run_overhead(steps)
    print("(c) one logging step per kind: demo model ...", flush=True)
    torch.manual_seed(0)
    demo_x, demo_y = shapes_probe(64, 32, seed=7)
    rows += kind_costs("SmallCNN 32 px", SmallCNN(), (demo_x, demo_y), 8, rounds=2 if args.quick else 5,
                       extrapolate_actmax=False)
    print("(c) one logging step per kind: ResNet-18 ...", flush=True)
    torch.manual_seed(0)
    res_x, res_y = shapes_probe(8, 224, seed=7)
    rows += kind_costs("ResNet-18 224 px", torchvision.models.resnet18(weights=None), (res_x, res_y), 8,
                       rounds=1 if args.quick else 2, extrapolate_actmax=True)
    return finish("VisLogger cost in a training loop", rows, args)


if __name__ == "__main__":
    main()
