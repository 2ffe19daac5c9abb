"""The explanation-quality metrics' cost, as multiples of one training step, measured side by side in one process.

On the demo CNN (``SmallCNN`` trained 150 steps, as ``bench_cam.py``), an 8-image 32 px probe with labels and boxes,
the default CAM methods (Grad-CAM, Grad-CAM++) and ``cam_batch_size``; the unit is one batch-64 training step. Round
by round, interleaved: the training step, one ``gradcam`` logging step with ``cam_metrics=False``, ``"cheap"``,
``True`` (the default: deletion / insertion of Grad-CAM's map of the predicted class only) and ``"all"``, and one
logging step of every default kind due at a Grad-CAM step of the default schedule. The loggers run with
``async_logging=False``: these figures are the whole work of a step, wherever it runs (``bench_async.py`` measures
what the training thread waits for). Within the default and ``"all"`` steps the deletion / insertion curves and the
confidence drop / increase are timed in place (the kind's own methods, wrapped); the forward passes of one step of
each are counted and checked against the formula. Deletion / insertion must not dominate the default logging step:
its share of the logging work at Grad-CAM steps, over a run (at 224 px they run at every 4th such step), is
checked. Then the same (2 rounds) on ResNet-18 with an 8-image 224 px probe, unit one batch-8 training step
(skipped with ``--quick``). The training steps really train: the predictions, and so how many images the two
target sets share, are those of the first logged step.

    python bench/bench_metrics.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torchvision
from bench_step import train_step_fn
from benchutil import Row, check, finish, info, interleaved, median_ms, parse_args, shapes_probe, train_demo_cnn

from cnnvis_tb import VisLogger
from cnnvis_tb.demo import MEAN, STD, ShapesDataset
from cnnvis_tb.kinds import DEFAULT_EVERY, DEFAULT_KINDS
from cnnvis_tb.kinds.cam_metrics import DELETION_STEPS
from cnnvis_tb.kinds.gradcam import GradCam


def timed_method(cls, name: str, seen: dict[int, list[float]]) -> Callable[[], None]:
    """Wrap ``cls.<name>`` so each call's seconds are appended to ``seen[id(instance)]``; returns the undo."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seen.setdefault(id(self), []).append(time.perf_counter() - start)

    setattr(cls, name, wrapper)
    return lambda: setattr(cls, name, original)


def case(name: str, model, batch, probe: ShapesDataset, rounds: int, *, default_step: bool) -> list[Row]:
    """The rows of one model: its training step on ``batch``, the ``gradcam`` logging step at each ``cam_metrics``
    setting, the costly metrics timed in place, and (``default_step``) every default kind due at a Grad-CAM step."""
    x, y = batch
    train_step = train_step_fn(model, x, y)
    common = dict(probe=probe.images, probe_labels=probe.labels, mean=MEAN, std=STD, strict=True, async_logging=False)
    boxes = dict(probe_boxes=probe.boxes)  # not with cam_metrics=False (nothing would score them: an error)
    due = [k for k in DEFAULT_KINDS if DEFAULT_EVERY["gradcam"] % DEFAULT_EVERY[k] == 0]  # at step 200, 400, ...
    dirs = [tempfile.TemporaryDirectory(prefix="bench_metrics_") for _ in range(5)]
    loggers = {
        "off": VisLogger(model, dirs[0].name, kinds=["gradcam"], cam_metrics=False, **common),
        "cheap": VisLogger(model, dirs[1].name, kinds=["gradcam"], cam_metrics="cheap", **common, **boxes),
        "default": VisLogger(model, dirs[2].name, kinds=["gradcam"], **common, **boxes),
        "all": VisLogger(model, dirs[4].name, kinds=["gradcam"], cam_metrics="all", **common, **boxes),
    }
    if default_step:
        loggers["default step"] = VisLogger(model, dirs[3].name, kinds=due, **common, **boxes)
    counter = iter(range(1, 1 << 30))
    for vis in loggers.values():
        vis.log_now(0)  # first-call costs (writer, layer table) out of the way
    deletion: dict[int, list[float]] = {}
    confidence: dict[int, list[float]] = {}
    undo = [timed_method(GradCam, "_deletion_insertion", deletion),
            timed_method(GradCam, "_confidence_changes", confidence)]
    try:
        with torch.no_grad():  # the model is in eval mode, as the logger left it (no training step yet)
            wrong = int((model(probe.images).argmax(1) != probe.labels).sum())
        n = len(probe)
        masked = n * 2 * (2 if wrong else 1)  # confidence: one probe pass per method and distinct target set
        perturbed = {"all": 2 * n + 2 * (DELETION_STEPS - 1) * 2 * (n + wrong),  # 2 methods; right predictions once
                     "default": 2 * n + 2 * (DELETION_STEPS - 1) * n}  # Grad-CAM, predicted class
        forwards = {}
        for key in ("default", "all"):
            seen = forwards[key] = []
            hook = model.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0].shape[0]))
            loggers[key].log_now(next(counter))
            hook.remove()
            assert sum(seen) == n + masked + perturbed[key], (key, seen, perturbed)  # + the shared pass
        fns = {"train step": train_step, **{key: (lambda v=v: v.log_now(next(counter))) for key, v in
                                            loggers.items()}}
        times = interleaved(fns, rounds=rounds, warmup=1)
    finally:
        for u in undo:
            u()
        for vis in loggers.values():
            vis.close()
        for d in dirs:
            d.cleanup()
    for key in ("default", "all"):
        kind = next(k for k in loggers[key]._kinds if k.name == "gradcam")
        times[f"deletion / insertion, {key}"] = deletion[id(kind)][-rounds:]  # the count and warm-up calls left out
        times[f"confidence, {key}"] = confidence[id(kind)][-rounds:]
    unit = times["train step"]

    def per_step(key: str) -> float:
        return statistics.median(t / u for t, u in zip(times[key], unit, strict=True))

    def share(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    every = DEFAULT_EVERY["gradcam"]
    k = next(kd for kd in loggers["default"]._kinds if kd.name == "gradcam").deletion_every  # from the input's size
    rows = [
        info(f"{name}: one training step (batch {len(x)}), median", median_ms(unit)),
        info(f"{name}: 'gradcam' logging step, cam_metrics=False / one training step", f"{per_step('off'):.1f}×"),
        info(f"{name}: 'gradcam' logging step, cam_metrics='cheap' / one training step", f"{per_step('cheap'):.1f}×"),
        info(f"{name}: 'gradcam' logging step, cam_metrics=True (default) / one training step",
             f"{per_step('default'):.1f}×"),
        info(f"{name}: 'gradcam' logging step, cam_metrics='all' / one training step", f"{per_step('all'):.1f}×"),
        info(f"{name}: deletion / insertion at the default (Grad-CAM, predicted class; {DELETION_STEPS} steps, "
             f"{perturbed['default']} perturbed images) / one training step",
             f"{per_step('deletion / insertion, default'):.2f}×"),
        info(f"{name}: deletion / insertion with cam_metrics='all' ({perturbed['all']} perturbed images, {wrong} of "
             f"{n} probe images with a wrong prediction) / one training step",
             f"{per_step('deletion / insertion, all'):.2f}×"),
        info(f"{name}: confidence drop / increase / one training step", f"{per_step('confidence, default'):.2f}×"),
        info(f"{name}: forward passes of a default / cam_metrics='all' step",
             f"{len(forwards['default'])} / {len(forwards['all'])}"),
        info(f"{name}: deletion / insertion / the whole 'gradcam' logging step, default / 'all'",
             f"{share('deletion / insertion, default', 'default'):.2f} / "
             f"{share('deletion / insertion, all', 'all'):.2f}"),
        info(f"{name}: deletion / insertion at the default interval (every {k * every} steps) / the training time",
             f"{per_step('deletion / insertion, default') / (k * every):.2%}"),
    ]
    if default_step:
        # Deletion / insertion run at every k-th Grad-CAM logging step by default (k from the input's size): over k
        # such steps the logging work is k default steps without them plus one run of them.
        kind = next(kd for kd in loggers["default step"]._kinds if kd.name == "gradcam")
        d = statistics.median(deletion[id(kind)][-rounds:])  # timed within the default steps themselves
        rest = statistics.median(t - dt for t, dt in zip(times["default step"], deletion[id(kind)][-rounds:],
                                                          strict=True))
        rows += [
            info(f"{name}: the default logging step at a Grad-CAM step ({', '.join(due)}) / one training step",
                 f"{per_step('default step'):.1f}×"),
            info(f"{name}: deletion / insertion / the default logging step at a Grad-CAM step where they run",
                 f"{share('deletion / insertion, default', 'default step'):.2f}"),
            check(f"{name}: deletion / insertion / the default logging work at Grad-CAM steps, over the run (they "
                  f"run at every {'' if k == 1 else f'{k}th '}Grad-CAM step: every {k * every} steps)",
                  d / (k * rest + d), "<=", 0.5, fmt="{:.2f}"),
        ]
    return rows


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    print("demo CNN ...", flush=True)
    rows = case("SmallCNN 8×32², Grad-CAM + Grad-CAM++", train_demo_cnn(40 if args.quick else 150),
                shapes_probe(64, 32, seed=7), ShapesDataset(8, 32, seed=123), 3 if args.quick else 9,
                default_step=True)
    if not args.quick:
        print("ResNet-18 ...", flush=True)
        torch.manual_seed(0)
        rows += case("ResNet-18 8×224² (untrained), Grad-CAM + Grad-CAM++",
                     torchvision.models.resnet18(weights=None, num_classes=4).eval(), shapes_probe(8, 224, seed=7),
                     ShapesDataset(8, 224, seed=123), 2, default_step=True)
    return finish("Explanation-quality metrics", rows, args)


if __name__ == "__main__":
    main()
