"""The CAM family's cost, measured side by side in one process.

(a) Every gradient method of one logging step together (Grad-CAM, Grad-CAM++, XGrad-CAM, HiRes-CAM, Layer-CAM,
    EigenGrad-CAM from one shared forward + one ``autograd.grad``, as the logger computes them) vs the floor (one
    hooked forward + one ``autograd.grad`` to the layer): demo CNN 8×32² and ResNet-18 8×224² (``--quick``: 4×64²).
(b) Ablation-CAM ours vs pytorch-grad-cam's ``AblationCAM`` (batch 32) on ResNet-18 4×64² ``layer4``, same maps.
(c) Score-CAM ours vs its own floor (the N×K masked no-grad forwards at the best of several batch sizes) and vs
    pytorch-grad-cam's ``ScoreCAM`` at the same batch size, ResNet-18 4×64² ``layer4``.
(d) Eigen-CAM vs one hooked no-grad forward.

    python bench/bench_cam.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from bench_gradcam import floor, pearson
from benchutil import check, finish, info, interleaved, median_ms, paired_ratio, parse_args, train_demo_cnn

from cnnvis_tb import cam
from cnnvis_tb.kinds.base import Needs
from cnnvis_tb.kinds.cam_methods import METHODS
from cnnvis_tb.kinds.gradcam import cam_from_gradients
from cnnvis_tb.probe_pass import run_probe_pass

GRADIENT_METHODS = [m for m, spec in METHODS.items() if spec.gradients]


def gradient_methods_together(model, layer, x, methods):
    """What the logger's gradcam kind computes for these gradient methods of one target set."""
    shared = run_probe_pass(model, x, Needs(graph_activations=(layer,)), None)
    acts, grads = shared.graph_activations[layer], shared.grads["pred"][layer]
    return [cam_from_gradients(acts, grads, m) for m in methods]


def case_gradients(name, model, layer, x, rounds):
    model.eval()
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        pred = model(x).argmax(1)
    weighted = [m for m in GRADIENT_METHODS if m != "eigengradcam"]
    times = interleaved({
        "floor": lambda: floor(model, module, x, pred),
        "all": lambda: gradient_methods_together(model, layer, x, GRADIENT_METHODS),
        "weighted": lambda: gradient_methods_together(model, layer, x, weighted),
    }, rounds=rounds)
    return [
        info(f"{name}: floor (hooked forward + autograd.grad), median", median_ms(times["floor"])),
        check(f"{name}: all {len(GRADIENT_METHODS)} gradient methods of a logging step / floor",
              paired_ratio(times, "all", "floor"), "<=", 1.3, unit="×"),
        info(f"{name}: the same without EigenGrad-CAM (its eigendecomposition per image) / floor",
             f"{paired_ratio(times, 'weighted', 'floor'):.2f}×"),
    ]


def pgc_runner(cls_name, model, layer, x, targets, **kwargs):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    twin = copy.deepcopy(model)
    extractor = getattr(pgc, cls_name)(model=twin, target_layers=[dict(twin.named_modules())[layer]])
    for key, value in kwargs.items():
        setattr(extractor, key, value)
    objects = [ClassifierOutputTarget(int(t)) for t in targets]

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return extractor(input_tensor=x, targets=objects)

    run.model = twin  # the copy it hooks, to count its forward passes
    return run


def counted(fn, modules):
    """``fn()`` and, per named module, ``(calls, images)``: how often it ran and on how many images in all."""
    seen = {name: [0, 0] for name in modules}

    def make(name):
        def pre_hook(_module, args):
            seen[name][0] += 1
            seen[name][1] += args[0].shape[0]

        return pre_hook

    handles = [m.register_forward_pre_hook(make(name)) for name, m in modules.items()]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, {name: tuple(v) for name, v in seen.items()}


def passes(counts, first="conv1", last="fc"):
    """``"calls (images) before the layer / after it"`` from :func:`counted`'s counts."""
    (c0, i0), (c1, i1) = counts[first], counts[last]
    return f"{c0} ({i0:,} images) / {c1} ({i1:,} images)"


def masked_floor(model, layer, x, batch):
    """The forwards Score-CAM cannot avoid: every masked image of every non-constant channel, no grad."""
    module = dict(model.named_modules())[layer]
    acts = {}
    with torch.no_grad():
        handle = module.register_forward_hook(lambda m, i, o: acts.update(a=o))
        model(x)
        handle.remove()
        up = F.interpolate(acts["a"], size=x.shape[-2:], mode="bilinear", align_corners=True)
        lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
        live = torch.nonzero((hi != lo).flatten(1))
        masks = (up - lo) / (hi - lo + 1e-8)
        for start in range(0, len(live), batch):
            rows = live[start:start + batch]
            model(x[rows[:, 0]] * masks[rows[:, 0], rows[:, 1]][:, None])
    return len(live)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    rounds = 3 if args.quick else 7
    torch.manual_seed(0)
    rows = []
    demo = train_demo_cnn(40 if args.quick else 150)
    rows += case_gradients("SmallCNN 8×32²", demo, "features", torch.randn(8, 3, 32, 32), rounds * 3)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    big = torch.randn(4, 3, 64, 64) if args.quick else torch.randn(8, 3, 224, 224)
    rows += case_gradients(f"ResNet-18 {big.shape[0]}×{big.shape[-1]}²", resnet, "layer4", big, rounds)

    x, targets = torch.randn(4, 3, 64, 64), torch.tensor([1, 4, 7, 9])
    perturbation_rounds = 2 if args.quick else 3
    ours_ab, ours_passes = counted(lambda: cam(resnet, x, "layer4", targets, "ablationcam", batch_size=128),
                                   {"conv1": resnet.conv1, "fc": resnet.fc})
    pgc_ab = pgc_runner("AblationCAM", resnet, "layer4", x, targets)
    pgc_maps, pgc_passes = counted(pgc_ab, {"conv1": pgc_ab.model.conv1, "fc": pgc_ab.model.fc})
    corr = min(pearson(a, b) for a, b in zip(ours_ab.numpy(), pgc_maps, strict=True))
    times = interleaved({"ours": lambda: cam(resnet, x, "layer4", targets, "ablationcam", batch_size=128),
                         "pgc": pgc_ab}, rounds=perturbation_rounds)
    rows += [
        info("ResNet-18 4×64² layer4 Ablation-CAM: ours (batch 128), median", median_ms(times["ours"])),
        info("ResNet-18 4×64² layer4 Ablation-CAM: pytorch-grad-cam (batch 32), median", median_ms(times["pgc"])),
        check("ResNet-18 4×64² layer4 Ablation-CAM: ours / pytorch-grad-cam", paired_ratio(times, "ours", "pgc"),
              "<=", 0.2, unit="×"),
        check("ResNet-18 4×64² layer4 Ablation-CAM: map correlation with pytorch-grad-cam, min", corr, ">=", 0.99,
              fmt="{:.4f}"),
        info("ResNet-18 4×64² layer4 Ablation-CAM: forward passes through conv1 / through fc, ours",
             passes(ours_passes)),
        info("ResNet-18 4×64² layer4 Ablation-CAM: forward passes through conv1 / through fc, pytorch-grad-cam",
             passes(pgc_passes)),
    ]

    batches = (16, 32, 64) if args.quick else (16, 32, 64, 128)
    floors = interleaved({b: (lambda b=b: masked_floor(resnet, "layer4", x, b)) for b in batches}, rounds=1,
                         warmup=0)
    best = min(batches, key=lambda b: float(np.median(floors[b])))
    pgc_sc = pgc_runner("ScoreCAM", resnet, "layer4", x, targets, batch_size=best)
    ours_sc, ours_passes = counted(lambda: cam(resnet, x, "layer4", targets, "scorecam", batch_size=best),
                                   {"conv1": resnet.conv1, "fc": resnet.fc})
    pgc_maps, pgc_passes = counted(pgc_sc, {"conv1": pgc_sc.model.conv1, "fc": pgc_sc.model.fc})
    corr = min(pearson(a, b) for a, b in zip(ours_sc.numpy(), pgc_maps, strict=True))
    times = interleaved({
        "ours": lambda: cam(resnet, x, "layer4", targets, "scorecam", batch_size=best),
        "floor": lambda: masked_floor(resnet, "layer4", x, best),
        "pgc": pgc_sc,
    }, rounds=perturbation_rounds)
    masked = masked_floor(resnet, "layer4", x, best)
    rows += [
        info(f"ResNet-18 4×64² layer4 Score-CAM: masked forwards ({masked} masked images in batches of {best}, "
             "the best of " + "/".join(map(str, batches)) + "), median", median_ms(times["floor"])),
        check("ResNet-18 4×64² layer4 Score-CAM: ours / its floor", paired_ratio(times, "ours", "floor"), "<=", 1.1,
              unit="×"),
        check("ResNet-18 4×64² layer4 Score-CAM: ours / pytorch-grad-cam (same batch)",
              paired_ratio(times, "ours", "pgc"), "<=", 1.0, unit="×"),
        check("ResNet-18 4×64² layer4 Score-CAM: map correlation with pytorch-grad-cam, min", corr, ">=", 0.99,
              fmt="{:.4f}"),
        info("ResNet-18 4×64² layer4 Score-CAM: forward passes (images), ours / pytorch-grad-cam",
             f"{ours_passes['conv1'][0]} ({ours_passes['conv1'][1]:,}) / {pgc_passes['conv1'][0]} "
             f"({pgc_passes['conv1'][1]:,})"),
    ]

    module = resnet.layer4

    def one_forward():
        with torch.no_grad():
            handle = module.register_forward_hook(lambda m, i, o: None)
            try:
                resnet(x)
            finally:
                handle.remove()

    times = interleaved({"eigencam": lambda: cam(resnet, x, "layer4", None, "eigencam"), "forward": one_forward},
                        rounds=rounds * 3)
    rows.append(check("ResNet-18 4×64² layer4 Eigen-CAM / one hooked forward", paired_ratio(times, "eigencam",
                                                                                             "forward"),
                      "<=", 1.2, unit="×"))
    return finish("CAM family", rows, args)


if __name__ == "__main__":
    main()
