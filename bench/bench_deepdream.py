"""DeepDream: what one logging step costs, what batching the probe images saves, and whether it amplifies the layer.

On the demo ``SmallCNN`` trained for 150 SGD steps (32 px inputs), at the layer ``VisLogger`` picks for DeepDream
(the middle of three convolutions spread over depth), with the default settings (3 octaves × 10 steps):

* cost: one DeepDream logging step (``vis.log_now(step, kinds=["deepdream"])``, 8 probe images, one layer and two
  layers) as a multiple of one training step (batch 64, SGD), interleaved round by round with it;
* batching: the 8 probe images dreamed as ONE batch (``deep_dream(model, probe, layer)``) vs one image at a time
  (8 calls, same settings), interleaved; ratio of the medians of the pairs;
* quality: over 64 held-out images, the fraction whose dream at least doubles the RMS of the layer's activation
  (the objective, measured with a plain forward pass) and the median gain; the median Pearson correlation of the
  image after the first octave with the probe image as that octave sees it (shrunk and enlarged again), and the
  fraction of dreams more correlated with their own probe image than with any other (recognisable).

    python bench/bench_deepdream.py [--quick]
"""

from __future__ import annotations

import copy
import statistics
import tempfile

import torch
import torch.nn.functional as F
from benchutil import Row, check, finish, info, interleaved, median_ms, parse_args, shapes_probe, train_demo_cnn
from torch import nn

from cnnvis_tb import VisLogger, feature_maps, find_layers
from cnnvis_tb.demo import MEAN, STD
from cnnvis_tb.kinds import DeepDream
from cnnvis_tb.kinds.deepdream import DreamConfig, deep_dream, octave_sizes

SIZE = 32
PROBE = 8


def _pixels(normalized: torch.Tensor) -> torch.Tensor:
    return (normalized * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)).clamp(0, 1)


def _rms(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    return feature_maps(model, images, [layer])[layer].square().mean(dim=(1, 2, 3)).sqrt()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).t()


def cost(model: nn.Module, probe: torch.Tensor, labels: torch.Tensor, layer: str, rounds: int) -> list[Row]:
    """One DeepDream logging step (one layer, two layers) per training step, interleaved."""
    x, y = shapes_probe(64, SIZE, seed=7)
    train_model = copy.deepcopy(model)
    opt = torch.optim.SGD(train_model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        train_model.train()
        loss = nn.functional.cross_entropy(train_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    dirs = [tempfile.TemporaryDirectory(prefix="bench_deepdream_") for _ in range(2)]
    common = dict(probe=probe[:PROBE], probe_labels=labels[:PROBE], mean=MEAN, std=STD, strict=True)
    one = VisLogger(model, dirs[0].name, kinds=["deepdream"], **common)
    deepest = find_layers(model, 3)[-1]
    two = VisLogger(model, dirs[1].name, kinds=[DeepDream(layers=[layer, deepest])], **common)
    counter = iter(range(1, 1 << 30))
    fns = {
        "train step": train_step,
        "deepdream": lambda: one.log_now(next(counter), kinds=["deepdream"]),
        "deepdream 2 layers": lambda: two.log_now(next(counter), kinds=["deepdream"]),
    }
    times = interleaved(fns, rounds=rounds)
    for vis in (one, two):
        vis.close()
    for d in dirs:
        d.cleanup()
    c = DreamConfig()

    def per_train_step(key: str) -> float:
        return statistics.median(t / u for t, u in zip(times[key], times["train step"], strict=True))

    return [
        info("SmallCNN 32 px: one training step (batch 64), median", median_ms(times["train step"])),
        info(
            f"one 'deepdream' logging step ({PROBE} images, {layer}, {c.octaves} octaves × {c.steps} steps), median",
            median_ms(times["deepdream"]),
        ),
        info("one 'deepdream' logging step / one training step", f"{per_train_step('deepdream'):.1f}×"),
        info(
            f"one 'deepdream' logging step at 2 layers ({layer}, {deepest}; one batch of {2 * PROBE}) / one "
            "training step",
            f"{per_train_step('deepdream 2 layers'):.1f}×",
        ),
    ]


def batching(model: nn.Module, probe: torch.Tensor, layer: str, rounds: int) -> list[Row]:
    """The probe dreamed as one batch vs image by image."""
    images = probe[:PROBE]
    fns = {
        "batch": lambda: deep_dream(model, images, layer, mean=MEAN, std=STD),
        "one at a time": lambda: [
            deep_dream(model, images[i : i + 1], layer, mean=MEAN, std=STD) for i in range(PROBE)
        ],
    }
    times = interleaved(fns, rounds=rounds)
    ratio = statistics.median(s / b for s, b in zip(times["one at a time"], times["batch"], strict=True))
    return [
        info(f"deep_dream of {PROBE} images as one batch, median", median_ms(times["batch"])),
        info(f"deep_dream of {PROBE} images one at a time, median", median_ms(times["one at a time"])),
        info(f"DeepDream speed-up: {PROBE} probe images as one batch vs one at a time", f"{ratio:.1f}×"),
    ]


def quality(model: nn.Module, probe: torch.Tensor, layer: str) -> list[Row]:
    """RMS gain of the dreams, and how recognisable the first octave's images are."""
    octaves = deep_dream(model, probe, layer, mean=MEAN, std=STD, keep_octaves=True)[layer]
    gain = _rms(
        model, (octaves[-1] - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1), layer
    ) / _rms(model, probe, layer)
    small = octave_sizes(SIZE, SIZE, DreamConfig.octaves, DreamConfig.octave_scale)[0]
    seen = F.interpolate(
        F.interpolate(_pixels(probe), size=small, mode="bilinear", antialias=True),
        size=(SIZE, SIZE),
        mode="bilinear",
        antialias=True,
    )
    r = _pearson(octaves[0], seen)
    identified = (r.argmax(dim=1) == torch.arange(len(probe))).float().mean()
    return [
        check(
            f"DeepDream at {layer}: images whose dream at least doubles the layer's RMS (median gain "
            f"{float(gain.median()):.1f}×, {len(probe)} images)",
            100 * float((gain >= 2).float().mean()),
            ">=",
            90,
            fmt="{:.0f}",
            unit=" %",
        ),
        info(
            "DeepDream first octave: median Pearson correlation with the probe image at that octave's size",
            f"{float(r.diagonal().median()):.2f}",
        ),
        check(
            "DeepDream first octave: dreams more correlated with their own probe image than with any other",
            100 * float(identified),
            ">=",
            90,
            fmt="{:.0f}",
            unit=" %",
        ),
    ]


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = train_demo_cnn(150)
    probe, labels = shapes_probe(64, SIZE)
    with tempfile.TemporaryDirectory(prefix="bench_deepdream_layer_") as log_dir:
        vis = VisLogger(model, log_dir, probe=probe[:PROBE], mean=MEAN, std=STD, kinds=["deepdream"])
        (layer,) = vis.layers["deepdream"]
        vis.close()
    print(f"cost at {layer} ...", flush=True)
    rows = cost(model, probe, labels, layer, rounds=3 if args.quick else 10)
    print("batching ...", flush=True)
    rows += batching(model, probe, layer, rounds=2 if args.quick else 5)
    print("quality ...", flush=True)
    rows += quality(model, probe, layer)
    return finish("DeepDream", rows, args)


if __name__ == "__main__":
    main()
