"""A visual of your own, logged by VisLogger beside the built-in ones: the mean activation of every channel.

    python examples/custom_kind.py                 # -> runs/custom_kind
    tensorboard --logdir runs                      # the "CNN Vis" tab shows a "Channel means" button

The kind below is defined in this file only; the package knows nothing about it. It gets what every kind gets:
the schedule, the safety guard (eval mode, RNG, flags and hooks put back), warn-once (or ``strict``), flushing,
its own tag family ``cnnvis/channel_means/...``, and a button in the CNN Vis tab.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_tb import Kind, Needs, VisLogger
from cnnvis_tb.demo import CLASSES, ShapesDataset, SmallCNN
from cnnvis_tb.progress import TrainingBar, fresh_run_dir
from cnnvis_tb.render import colorize


class ChannelMeans(Kind):
    """A heat strip per layer: one row per probe image, one column per channel, the colour the channel's mean
    activation on that image (viridis, one scale per picture). Also logs the fraction of channels that are zero
    on every probe image ("dead") as a scalar."""

    name = "channel_means"
    label = "Channel means"
    every = 50

    def needs(self) -> Needs:
        return Needs(activations=tuple(self.layers))  # detached copies from the shared forward pass

    def log(self, ctx, out, computed) -> None:
        for layer in self.layers:
            acts = ctx.shared.activations[layer].float()  # [N, C, h, w]
            means = acts.mean(dim=(2, 3)).cpu()  # [N, C]
            scaled = (means - means.min()) / (means.max() - means.min()).clamp_min(1e-8)
            # Cells of 8 x 8 pixels, so a 32-channel layer of 8 probe images is a 256 x 64 picture.
            strip = F.interpolate(colorize(scaled)[None], scale_factor=8, mode="nearest")[0]
            out.image(layer, "all", strip)
            dead = (acts.amax(dim=(0, 2, 3)) <= 0).float().mean()
            out.scalar(layer, "dead_fraction", dead.item())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs", help="parent folder of the run (default: runs)")
    p.add_argument("--run-name", default="custom_kind", help="sub-folder of this run (default: custom_kind)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train = ShapesDataset(2048, 32, seed=args.seed)
    test = ShapesDataset(64, 32, seed=args.seed + 10_000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    log_dir = str(fresh_run_dir(f"{args.logdir}/{args.run_name}"))  # a new folder if that run holds events
    every = max(1, args.steps // 4)
    vis = VisLogger(
        model, log_dir, probe=test, mean=train.mean, std=train.std, class_names=CLASSES,
        kinds=["gradcam", "features", ChannelMeans(every=every)],  # built-in names and your kind, mixed
        every={"gradcam": every, "features": every},
    )
    start, step = time.perf_counter(), 0
    bar = TrainingBar(args.steps, vis)
    while step < args.steps:
        for x, y in loader:
            if step >= args.steps:
                break
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.step(step, loss.item(), logged=vis.step(step))
            step += 1
    bar.close()
    vis.log_now(args.steps)
    vis.close()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; logged to {log_dir}")
    print(f"now run:  tensorboard --logdir {args.logdir}   and open the 'CNN Vis' tab ('Channel means')")
    return log_dir


if __name__ == "__main__":
    main()
