"""Train a small CNN on generated shapes (offline, about a minute on 2 CPU cores) and log it with VisLogger.

    python examples/train_shapes.py                       # -> runs/shapes
    python examples/train_shapes.py --run-name lr0.3 --lr 0.3
    tensorboard --logdir runs                              # open the "CNN Vis" tab
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.demo import CLASSES, ShapesDataset, SmallCNN
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS
from cnnvis_tb.kinds.saliency import SALIENCY_METHODS
from cnnvis_tb.progress import TrainingBar, fresh_run_dir, show_progress_logs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs", help="parent folder of the runs (default: runs)")
    p.add_argument("--run-name", default="shapes",
                   help="sub-folder of this run (default: shapes); if it already holds events, the first free "
                        "shapes-2, shapes-3, ... is used instead, so two trainings never mix in one run")
    p.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default: 0)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--every", type=int, default=None,
                   help="log every kind every N steps (default: VisLogger's per-kind schedule, scaled to --steps)")
    p.add_argument("--kinds", nargs="+", default=None,
                   help="visual kinds to log (default: VisLogger's, kernels features gradcam actmax histograms health)")
    p.add_argument("--actmax-steps", type=int, default=DEFAULT_STEPS, help="gradient-ascent steps per actmax log")
    p.add_argument("--saliency-methods", nargs="+", choices=SALIENCY_METHODS, default=["vanilla"], metavar="METHOD",
                   help=f"saliency maps shown side by side when the saliency kind is logged, among "
                        f"{', '.join(SALIENCY_METHODS)} (default: vanilla)")
    p.add_argument("--augment", action="store_true", help="random horizontal flips and shifts")
    p.add_argument("--no-vis", action="store_true", help="train without VisLogger (for comparisons)")
    return p.parse_args(argv)


def default_every(steps: int) -> dict[str, int]:
    """About 12 logs of the cheap kinds and 3 of activation maximization over the run."""
    base = max(1, steps // 12)
    return {"kernels": base, "histograms": base, "features": base, "gradcam": base, "actmax": max(1, steps // 3)}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dy, dx = torch.randint(-3, 4, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train = ShapesDataset(4096, args.size, seed=args.seed)
    test = ShapesDataset(512, args.size, seed=args.seed + 10_000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    aug_gen = torch.Generator().manual_seed(args.seed)

    log_dir = f"{args.logdir}/{args.run_name}"
    if not args.no_vis:
        fresh = fresh_run_dir(log_dir)
        if str(fresh) != str(log_dir):
            print(f"{log_dir} already holds events of another training: logging to {fresh} instead")
            log_dir = str(fresh)
        show_progress_logs()
    vis = None if args.no_vis else VisLogger(
        model, log_dir,
        probe=test, probe_size=8,            # the first 8 test images, with their labels
        # and their objects' boxes: Grad-CAM's pointing game over the run (scored by the gradcam kind)
        probe_boxes=test.boxes[:8] if args.kinds is None or "gradcam" in args.kinds else None,
        mean=train.mean, std=train.std, class_names=CLASSES,
        every=args.every or default_every(args.steps), kinds=args.kinds, actmax_steps=args.actmax_steps,
        saliency_methods=args.saliency_methods,
    )
    writer = vis.writer if vis else None
    start, step = time.perf_counter(), 0
    bar = TrainingBar(args.steps, vis)
    while step < args.steps:
        for x, y in loader:
            if step >= args.steps:
                break
            model.train()
            if args.augment:
                x = augment(x, aug_gen)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            logged = vis.step(step) if vis else False
            if vis and step % 20 == 0:
                writer.add_scalar("train/loss", loss.item(), step)
            bar.step(step, loss.item(), logged=logged)
            step += 1
    bar.close()
    accuracy = evaluate(model, test)
    if vis:
        vis.log_now(args.steps)  # the final state, every kind
        writer.add_scalar("test/accuracy", accuracy, args.steps)
        vis.close()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; test accuracy {accuracy:.1%}")
    if vis:
        print(f"logged to {log_dir}\nnow run:  tensorboard --logdir {args.logdir}   and open the 'CNN Vis' tab")
    return accuracy


@torch.no_grad()
def evaluate(model: nn.Module, data: ShapesDataset) -> float:
    model.eval()
    pred = model(data.images).argmax(1)
    model.train()
    return (pred == data.labels).float().mean().item()


if __name__ == "__main__":
    main()
