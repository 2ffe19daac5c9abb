"""Train the shapes demo several times with different settings into one folder, to compare the runs side by side.

    python examples/compare_runs.py                                  # runs/compare/lr0.05 and runs/compare/lr0.5
    python examples/compare_runs.py --lrs 0.05 --augment both        # lr0.05 and lr0.05-aug
    python examples/compare_runs.py --lrs 0.01 0.05 0.5 --steps 300
    tensorboard --logdir runs/compare                                # "CNN Vis" tab: one row per run

Every run starts from the same seed (same initial weights, same data, same probe images) and logs on the same
steps, so the tab's rows differ only by the setting that was changed. Runs are trained one after the other with
examples/train_shapes.py.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def load_train_shapes():
    """The sibling example ``train_shapes.py`` as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("train_shapes", Path(__file__).with_name("train_shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/compare", help="folder holding one sub-folder per run "
                   "(default: runs/compare)")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.5], metavar="LR",
                   help="one run per SGD learning rate (default: 0.05 0.5)")
    p.add_argument("--augment", choices=["off", "on", "both"], default="off",
                   help="random flips and shifts: off, on, or both (a run with and one without for each lr)")
    p.add_argument("--steps", type=int, default=600, help="training steps of each run (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="the seed shared by all runs (default: 0)")
    p.add_argument("--every", type=int, default=None,
                   help="log every kind every N steps (default: train_shapes.py's schedule for --steps)")
    return p


def plan_runs(lrs: list[float], augment: str) -> list[tuple[str, list[str]]]:
    """``[(run name, train_shapes.py arguments of that run), ...]``: one run per lr and augmentation setting."""
    runs = []
    for lr in lrs:
        for augmented in {"off": [False], "on": [True], "both": [False, True]}[augment]:
            name = f"lr{lr:g}" + ("-aug" if augmented else "")
            runs.append((name, ["--lr", repr(lr)] + (["--augment"] if augmented else [])))
    return runs


def main(argv=None) -> dict[str, float]:
    """Train every planned run; returns ``{run name: test accuracy}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.lrs)) != len(args.lrs):
        parser.error(f"--lrs holds a value twice: {args.lrs}")
    if any(lr <= 0 for lr in args.lrs):
        parser.error(f"learning rates must be > 0, got {args.lrs}")
    runs = plan_runs(args.lrs, args.augment)
    logdir = Path(args.logdir)
    # Events of an earlier run in the same folder would mix two trainings in one row of the tab.
    used = [name for name, _ in runs if any((logdir / name).glob("events.out.tfevents.*"))]
    if used:
        parser.error(f"{', '.join(str(logdir / n) for n in used)} already hold(s) events; "
                     "choose another --logdir or remove those folders")

    train_shapes = load_train_shapes()
    shared = ["--logdir", str(logdir), "--steps", str(args.steps), "--seed", str(args.seed)]
    if args.every is not None:
        shared += ["--every", str(args.every)]
    results = {}
    for i, (name, options) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {name}")
        results[name] = train_shapes.main(shared + ["--run-name", name] + options)
    width = max(len(name) for name in results)
    print("\nrun".ljust(width + 3) + "test accuracy")
    for name, accuracy in results.items():
        print(f"{name:<{width}}  {accuracy:.1%}")
    print(f"\ncompare them:  tensorboard --logdir {logdir}   and open the 'CNN Vis' tab")
    return results


if __name__ == "__main__":
    main()
