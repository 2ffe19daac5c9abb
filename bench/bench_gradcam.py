"""Grad-CAM / Grad-CAM++: ``cnnvis_tb.grad_cam`` against the floor, pytorch-grad-cam and torchcam.

Two cases, each with the same model, layer, inputs and per-image targets (the predicted class of each
image, passed explicitly) for every library:

* ResNet-18 from torchvision (``weights=None``), 8 × 3 × 224 × 224 shape images, layer ``layer4``;
* the demo ``SmallCNN`` trained for 150 SGD steps on ``ShapesDataset``, 64 × 3 × 32 × 32, layer ``features``.

Timed, interleaved round by round in this one process:

* ours: ``cnnvis_tb.grad_cam(model, x, layer, targets, method)`` ([N, H, W] in [0, 1], input resolution);
* the floor: one forward pass with a forward hook on the layer plus one ``torch.autograd.grad`` from the
  summed target scores to the layer's output (no CAM arithmetic at all) — what any method must pay;
* pytorch-grad-cam: ``GradCAM`` / ``GradCAMPlusPlus`` built once outside the timing, called with
  ``ClassifierOutputTarget`` targets (it runs ``backward()`` into every parameter's ``.grad``);
* torchcam: ``GradCAM`` / ``GradCAMpp`` built once; timed as forward + ``cam(class_idx, scores)`` + the
  bilinear resize of the maps to the input resolution (ours includes that resize too).

Each library hooks its own copy of the model (same weights), so no library's hooks slow another's forward.
Agreement: Pearson correlation per image between our maps and pytorch-grad-cam's (both at input resolution).
The logger's shared pass: one ``VisLogger`` Grad-CAM logging step (true and predicted class, Grad-CAM and
Grad-CAM++, rendered and written) on 8 probe images, relative to the floor on the same 8 images; its
shared forward + gradients alone (``cnnvis_tb.probe_pass.run_probe_pass`` with the Grad-CAM kind's needs, without
rendering); and the
number of forward passes it runs (one, whatever the targets; four separate ``grad_cam`` calls would run four).

    python bench/bench_gradcam.py [--quick]
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from benchutil import (
    Row,
    check,
    finish,
    info,
    interleaved,
    median_ms,
    paired_ratio,
    parse_args,
    shapes_probe,
    train_demo_cnn,
)
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchcam.methods import GradCAM as TcGradCAM
from torchcam.methods import GradCAMpp as TcGradCAMpp

from cnnvis_tb import VisLogger, grad_cam
from cnnvis_tb.demo import CLASSES, MEAN, STD
from cnnvis_tb.probe_pass import run_probe_pass

METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
LOGGER_PROBE = 8  # VisLogger's default probe_size


@dataclass
class Case:
    """One model / layer / input set to compare the libraries on."""

    name: str
    model: nn.Module  # eval mode
    layer: str
    images: torch.Tensor
    labels: torch.Tensor  # true classes (the logger's "true" target)
    rounds: int
    class_names: tuple[str, ...] | None = None


def floor(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The least any Grad-CAM must compute: forward with a hook, then d(target scores)/d(layer output)."""
    saved = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.__setitem__("a", out))
    try:
        scores = model(x)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), saved["a"])
    return grads


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two maps; two constant maps agree (1.0), one constant and one not do not (0.0)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def baseline_runners(case: Case, targets: torch.Tensor) -> dict[str, Callable[[], np.ndarray]]:
    """pytorch-grad-cam and torchcam extractors, each on its own copy of the model, built once."""
    runners: dict[str, Callable[[], np.ndarray]] = {}
    x = case.images
    size = tuple(x.shape[-2:])
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    for method, cls in (("gradcam", PgcGradCAM), ("gradcam++", PgcGradCAMPlusPlus)):
        m = copy.deepcopy(case.model)
        cam = cls(model=m, target_layers=[m.get_submodule(case.layer)])
        runners[f"pgc {method}"] = lambda cam=cam: cam(input_tensor=x, targets=pgc_targets)
    class_idx = [int(t) for t in targets]
    for method, cls in (("gradcam", TcGradCAM), ("gradcam++", TcGradCAMpp)):
        m = copy.deepcopy(case.model).eval()
        extractor = cls(m, case.layer, input_shape=tuple(x.shape[1:]))

        def run(m=m, extractor=extractor) -> np.ndarray:
            maps = extractor(class_idx, m(x))[0]
            return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()

        runners[f"tc {method}"] = run
    return runners


def correlation_rows(case: Case, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> list[Row]:
    rows = []
    for method, label in METHODS.items():
        r = [pearson(a, b) for a, b in zip(ours[method], theirs[method], strict=True)]
        rows.append(check(f"{case.name} {label}: map correlation with pytorch-grad-cam, min (mean {np.mean(r):.4f})",
                          min(r), ">=", 0.99, fmt="{:.4f}"))
    return rows


def count_forwards(model: nn.Module, fn: Callable[[], object]) -> int:
    """How many times ``model`` itself is called during ``fn()``."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def run_case(case: Case) -> list[Row]:
    """Time ours, the floor, both baselines and the logger's shared pass on one case; check agreement."""
    model, x = case.model, case.images
    layer = model.get_submodule(case.layer)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    fns: dict[str, Callable[[], object]] = {
        "floor": lambda: floor(model, layer, x, targets),
        **{f"ours {m}": (lambda m=m: grad_cam(model, x, case.layer, targets, m)) for m in METHODS},
        **baseline_runners(case, targets),
    }
    ours_maps = {m: fns[f"ours {m}"]().numpy() for m in METHODS}
    pgc_maps = {m: np.asarray(fns[f"pgc {m}"]()) for m in METHODS}

    # The logger's shared pass on the first LOGGER_PROBE images (true and predicted class, both methods); the CAM
    # metrics, which run the model again, are left out here (bench_metrics.py measures them).
    xp, yp, tp = x[:LOGGER_PROBE], case.labels[:LOGGER_PROBE], targets[:LOGGER_PROBE]
    log_dir = tempfile.TemporaryDirectory(prefix="bench_gradcam_")
    vis = VisLogger(model, log_dir.name, probe=xp, probe_labels=yp, mean=MEAN, std=STD, class_names=case.class_names,
                    kinds=["gradcam"], layers={"gradcam": [case.layer]}, cam_metrics=False, strict=True)
    step = iter(range(1, 1 << 30))
    fns["logger step"] = lambda: vis.log_now(next(step))
    # White-box: the logger's shared forward + gradients alone, without rendering and writing.
    needs, xp_model = vis.kind("gradcam").needs(), xp.to(device=next(model.parameters()).device)
    fns["logger pass"] = lambda: run_probe_pass(model, xp_model, needs, yp)
    if len(xp) != len(x):
        fns["floor (probe)"] = lambda: floor(model, layer, xp, tp)
    probe_floor = "floor (probe)" if len(xp) != len(x) else "floor"
    forwards = count_forwards(model, lambda: vis.log_now(0))

    times = interleaved(fns, rounds=case.rounds)
    vis.close()
    log_dir.cleanup()

    rows = [
        info(f"{case.name}: predicted class == true class", f"{int((targets == case.labels).sum())}/{len(x)}"),
        info(f"{case.name}: floor (forward + autograd.grad), median", median_ms(times["floor"])),
    ]
    for method, label in METHODS.items():
        ours = f"ours {method}"
        rows += [
            info(f"{case.name} {label}: ours, median", median_ms(times[ours])),
            check(f"{case.name} {label}: ours / floor", paired_ratio(times, ours, "floor"), "<=", 1.3, unit="×"),
            check(f"{case.name} {label}: ours / pytorch-grad-cam", paired_ratio(times, ours, f"pgc {method}"),
                  "<=", 0.5, unit="×"),
            check(f"{case.name} {label}: ours / torchcam", paired_ratio(times, ours, f"tc {method}"),
                  "<=", 1.1, unit="×"),
        ]
    rows += correlation_rows(case, ours_maps, pgc_maps)
    wrong = int((tp != yp).sum())
    rows += [
        info(f"{case.name}: logger Grad-CAM step ({len(xp)} probe images, true+pred × 2 methods, rendered, no "
             f"metrics) / floor on the same images", f"{paired_ratio(times, 'logger step', probe_floor):.2f}×"),
        info(f"{case.name}: of which the shared forward + gradients (run_probe_pass) / floor",
             f"{paired_ratio(times, 'logger pass', probe_floor):.2f}×"),
        check(f"{case.name}: forward passes per logger Grad-CAM step ({wrong}/{len(xp)} probe images mispredicted)",
              forwards, "<=", 1, fmt="{:d}"),
    ]
    return rows


def resnet_case(rounds: int) -> Case:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images, labels = shapes_probe(8, 224)
    return Case("ResNet-18 8×224²", model, "layer4", images, labels, rounds)


def demo_case(rounds: int, train_steps: int) -> Case:
    model = train_demo_cnn(train_steps)
    images, labels = shapes_probe(64, 32)
    return Case("SmallCNN 64×32²", model, "features", images, labels, rounds, CLASSES)


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    warnings.filterwarnings("ignore", module="torchcam")
    rows: list[Row] = []
    cases = (resnet_case(rounds=2 if args.quick else 5), demo_case(5 if args.quick else 15, 60 if args.quick else 150))
    for case in cases:
        print(f"running {case.name} ({case.rounds} rounds) ...", flush=True)
        rows += run_case(case)
    return finish("Grad-CAM / Grad-CAM++ (ratios: median over interleaved rounds)", rows, args)


if __name__ == "__main__":
    main()
