"""Activation maximization: one batched optimization vs channel by channel, image quality, background mode.

On the demo ``SmallCNN`` trained for 150 SGD steps (32 px inputs), at the layers ``VisLogger`` picks for
activation maximization by default:

* speed: K = 16 channels of the deepest such layer optimized as ONE batch
  (``activation_maximization(model, layer, channels, 32)``, default steps) vs the same 16 channels optimized one
  at a time (16 calls, same steps and size), interleaved round by round; ratio of the medians of the pairs;
* where that ratio comes from, per optimization step: the model's part (forward pass to the layer's input and
  the gradient with respect to the images, in the layouts actmax uses) timed apart for 1 and for 16 images,
  actmax's own work (the rest of the measured step) for 1 and for 16 images, and the own work of the batch an
  8x speed-up would allow: ``16 (model_1 + own_1) / 8 - model_16``. The batch holds one image's own work and
  more, so ``16 (model_1 + own_1) / (model_16 + own_1)`` bounds the speed-up on this machine (printed as the
  ceiling);
* quality: for each layer, the fraction of 16 channels whose synthesized image excites the channel more
  than every one of 64 held-out ``ShapesDataset`` images does (objective: the channel's spatial mean
  activation at that layer, model in eval mode, no augmentation);
* diversity: ``diversity=3`` (three images per channel, pushed apart by their Gram matrices) on the same 16
  channels of each layer: the mean pairwise cosine similarity of the Gram matrices of the layer's activation of
  one channel's images, with the default weight vs weight 0 (three images from different noise, not pushed
  apart), and the fraction of channels whose three images all beat every held-out image (target >= 90 %);
* background: ``VisLogger(..., actmax_background=True)``: time ``vis.log_now(step, kinds=["actmax"])`` blocks
  the training thread, as a fraction of the synchronous call on the same model state; training steps then
  go on while the worker runs; after ``close()`` the events are read back with TensorBoard's
  ``EventAccumulator``: the pictures must be logged at the snapshot's step, and equal the synchronous ones.

    python bench/bench_actmax.py [--quick]
"""

from __future__ import annotations

import io
import statistics
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from benchutil import (
    Row,
    check,
    finish,
    info,
    interleaved,
    median_ms,
    parse_args,
    shapes_probe,
    time_call,
    train_demo_cnn,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cnnvis_tb import VisLogger, activation_maximization, feature_maps, tags
from cnnvis_tb.demo import MEAN, STD
from cnnvis_tb.hooks import capture
from cnnvis_tb.kinds.actmax import DEFAULT_DIVERSITY_WEIGHT, DEFAULT_STEPS, gram_similarity
from cnnvis_tb.safety import preserved

K = 16
STEPS = DEFAULT_STEPS  # VisLogger's default actmax_steps
SIZE = 32


def spread(total: int, count: int) -> list[int]:
    """``count`` channel indices spread evenly over ``total`` channels."""
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(min(count, total))})


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def channel_means(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """``[N, C]`` spatial mean activation of every channel of ``layer`` (eval mode)."""
    return feature_maps(model, x, [layer])[layer].mean(dim=(2, 3))


def speed(model: nn.Module, layer: str, channels: list[int], rounds: int) -> tuple[list[Row], torch.Tensor]:
    """Batched vs one-at-a-time optimization of the same channels; returns rows and the batched images."""
    kwargs = dict(mean=MEAN, std=STD, steps=STEPS)
    fns = {
        "batch": lambda: activation_maximization(model, layer, channels, SIZE, **kwargs),
        "one at a time": lambda: [activation_maximization(model, layer, [c], SIZE, **kwargs) for c in channels],
    }
    times = interleaved(fns, rounds=rounds)
    ratio = statistics.median(s / b for s, b in zip(times["one at a time"], times["batch"], strict=True))
    rows = [
        info(f"actmax {len(channels)} channels of {layer}, {STEPS} steps, {SIZE} px: one batch, median",
             median_ms(times["batch"])),
        info(f"actmax {len(channels)} channels of {layer}: one at a time, median", median_ms(times["one at a time"])),
        check(f"actmax speed-up: {len(channels)} channels as one batch vs one at a time", ratio, ">=", 8, fmt="{:.1f}",
              unit="×"),
    ]
    return rows, fns["batch"]()


def model_part(model: nn.Module, layer: str, images: int) -> Callable[[], object]:
    """The model's part of one actmax step for ``images`` images: forward to ``layer``'s input, input gradient."""
    module = dict(model.named_modules())[layer]
    layout = torch.channels_last if images > 1 else torch.contiguous_format  # as optimize_channels chooses
    x0 = torch.rand(images, 3, SIZE, SIZE).contiguous(memory_format=layout)

    def run() -> None:
        x = x0.clone().requires_grad_(True)
        with capture({}, for_grad=True, stop_before={layer: module}) as acts:
            model(x)
        torch.autograd.grad(acts[f"{layer}:input"].sum(), [x])

    return run


def ceiling(model: nn.Module, layer: str, batch_ms: float, single_ms: float, rounds: int) -> list[Row]:
    """How the batching speed-up splits into the model's part and actmax's own work, per optimization step."""
    one, batch = model_part(model, layer, 1), model_part(model, layer, K)
    with preserved(model):
        times = interleaved({"one": lambda: [one() for _ in range(K)], "batch": batch}, rounds=rounds)
    model_16, model_1 = statistics.median(times["batch"]) * 1e3, statistics.median(times["one"]) * 1e3 / K
    own_16 = batch_ms / STEPS - model_16  # actmax's own work per step: parametrization, augmentation, penalties, Adam
    own_1 = single_ms / K / STEPS - model_1
    allowed = K * (model_1 + own_1) / 8 - model_16  # own work per step of the batch at which the speed-up is 8x
    return [
        info(f"model's part of an actmax step (forward to {layer}'s input + image gradient): 1 image / 16 images "
             f"({K * model_1 / model_16:.1f}× from batching)", f"{model_1:.2f} / {model_16:.2f} ms"),
        info("actmax's own work per step (everything else): 1 image / 16 images", f"{own_1:.2f} / {own_16:.2f} ms"),
        info("own work per step of the 16-image batch that an 8× speed-up would allow", f"{allowed:.2f} ms"),
        info("ceiling of the speed-up: the batch's own work no more than one image's",
             f"{K * (model_1 + own_1) / (model_16 + own_1):.1f}×"),
    ]


def quality(model: nn.Module, layer: str, channels: list[int], images: torch.Tensor,
            probe: torch.Tensor) -> Row:
    """Fraction of channels whose synthesized image beats every probe image on the channel's mean activation."""
    synth = channel_means(model, normalize(images), layer)[torch.arange(len(channels)), channels]
    best_real = channel_means(model, probe, layer)[:, channels].amax(dim=0)
    wins = (synth > best_real).float()
    ratio = float((synth / best_real.clamp_min(1e-6)).median())
    return check(f"actmax quality at {layer}: channels whose image beats all {len(probe)} probe images "
                 f"(median synth/best-real {ratio:.1f}×)", 100 * float(wins.mean()), ">=", 90, fmt="{:.0f}",
                 unit=" %")


def diversity(model: nn.Module, layer: str, channels: list[int], probe: torch.Tensor, d: int = 3) -> list[Row]:
    """Gram-matrix cosine of one channel's ``d`` images with and without the diversity penalty, and the fraction
    of channels whose ``d`` images (with it) all beat every probe image."""
    best_real = channel_means(model, probe, layer)[:, channels].amax(dim=0)
    wanted = torch.tensor(channels).repeat_interleave(d)
    cosine, wins = {}, 0.0
    for weight in (0.0, DEFAULT_DIVERSITY_WEIGHT):
        images = activation_maximization(model, layer, channels, SIZE, mean=MEAN, std=STD, steps=STEPS,
                                         diversity=d, diversity_weight=weight)
        acts = feature_maps(model, normalize(images), [layer])[layer]
        sim = gram_similarity(acts, d)
        cosine[weight] = float(((sim.sum(dim=(1, 2)) - d) / (d * (d - 1))).mean())
        synth = acts.mean(dim=(2, 3))[torch.arange(len(wanted)), wanted].view(-1, d)
        wins = float((synth > best_real[:, None]).all(dim=1).float().mean())
    return [
        info(f"actmax diversity={d} at {layer}: mean Gram cosine of one channel's images, weight "
             f"{DEFAULT_DIVERSITY_WEIGHT} / weight 0", f"{cosine[DEFAULT_DIVERSITY_WEIGHT]:.3f} / {cosine[0.0]:.3f}"),
        check(f"actmax diversity={d} at {layer}: channels whose {d} images all beat all {len(probe)} probe images",
              100 * wins, ">=", 90, fmt="{:.0f}", unit=" %"),
    ]


def decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def read_images(log_dir: str, tag: str) -> dict[int, np.ndarray]:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    return {e.step: decode(e) for e in acc.Images(tag)} if tag in acc.Tags()["images"] else {}


def background(model: nn.Module, probe: torch.Tensor, labels: torch.Tensor, rounds: int) -> list[Row]:
    """Blocking time of a background actmax log vs a synchronous one, and what it logged."""
    common = dict(probe=probe[:8], probe_labels=labels[:8], mean=MEAN, std=STD, strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    sync_dir = tempfile.TemporaryDirectory(prefix="bench_actmax_sync_")
    sync = VisLogger(model, sync_dir.name, **common)
    sync.log_now(0, kinds=["kernels"])  # first-call costs (writer, layer table) out of the way
    fractions, sync_times, block_times, at_step, identical = [], [], [], True, True
    for r in range(rounds):
        step = 100 * (r + 1)
        with tempfile.TemporaryDirectory(prefix="bench_actmax_bg_") as bg_dir:
            bg = VisLogger(model, bg_dir, actmax_background=True, **common)
            bg.log_now(0, kinds=["kernels"])
            # The synchronous call first, so the background worker never competes with it for the CPU;
            # both see the same model state.
            spent = {name: time_call(lambda vis=vis, step=step: vis.log_now(step, kinds=["actmax"]))
                     for name, vis in (("sync", sync), ("bg", bg))}
            for _ in range(3):  # training goes on while the worker optimizes on its snapshot
                model.train()
                loss = loss_fn(model(probe), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            bg.close()
            for layer in bg.layers["actmax"]:
                tag = tags.image_tag("actmax", layer, "channels")
                logged = read_images(bg_dir, tag)
                at_step &= set(logged) == {step}
                reference = read_images(sync_dir.name, tag).get(step)
                identical &= reference is not None and step in logged and np.array_equal(reference, logged[step])
        fractions.append(spent["bg"] / spent["sync"])
        sync_times.append(spent["sync"])
        block_times.append(spent["bg"])
    sync.close()
    sync_dir.cleanup()
    return [
        info("actmax log (2 layers × 8 channels): synchronous log_now, median", median_ms(sync_times)),
        info("actmax_background=True: log_now blocking time, median", median_ms(block_times)),
        info("actmax_background=True: blocking time / synchronous time", f"{statistics.median(fractions):.3f}"),
        Row("background actmax logged at the snapshot's step after close()", "yes" if at_step else "no", "yes",
            at_step),
        Row("background actmax pictures equal the synchronous ones of the same state", "yes" if identical else "no",
            "yes", identical),
    ]


def main(argv=None) -> list[Row]:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = train_demo_cnn(150)
    probe, labels = shapes_probe(64, SIZE)
    with tempfile.TemporaryDirectory(prefix="bench_actmax_layers_") as log_dir:
        vis = VisLogger(model, log_dir, probe=probe[:8], mean=MEAN, std=STD)
        layers = list(vis.layers["actmax"])
        vis.close()
    widths = {layer: channel_means(model, probe[:1], layer).shape[1] for layer in layers}
    print(f"speed at {layers[-1]} ...", flush=True)
    deepest = layers[-1]
    rows, images = speed(model, deepest, spread(widths[deepest], K), rounds=2 if args.quick else 5)
    rows += ceiling(model, deepest, *(float(r.value.split()[0]) for r in rows[:2]), rounds=20 if args.quick else 60)
    synthesized = {deepest: images}
    for layer in layers:
        channels = spread(widths[layer], K)
        if layer not in synthesized:
            synthesized[layer] = activation_maximization(model, layer, channels, SIZE, mean=MEAN, std=STD,
                                                         steps=STEPS)
        rows.append(quality(model, layer, channels, synthesized[layer], probe))
    print("diversity ...", flush=True)
    for layer in layers:
        rows += diversity(model, layer, spread(widths[layer], K), probe)
    print("background mode ...", flush=True)
    rows += background(model, probe, labels, rounds=2 if args.quick else 4)
    return finish("Activation maximization", rows, args)


if __name__ == "__main__":
    main()
