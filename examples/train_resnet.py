"""Train a torchvision ResNet-18 (no pretrained weights) on an ImageFolder or CIFAR-10 and log it with VisLogger.

    python examples/train_resnet.py --data-root path/to/images           # one sub-folder per class
    python examples/train_resnet.py --dataset cifar10 --data-root data   # needs data/cifar-10-batches-py
    tensorboard --logdir runs                                            # open the "CNN Vis" tab

Nothing is downloaded: the images must already be on disk. ImageFolder means ``root/<class>/<image>`` (any
format PIL reads); CIFAR-10 means the extracted "python version" archive, ``root/cifar-10-batches-py/``.
For images of 64 pixels or less the ResNet gets the usual CIFAR stem (3×3 stride-1 first convolution, no
max-pooling), so its last block still has a spatial map for Grad-CAM to show.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import ALL_KINDS, DEFAULT_KINDS
from cnnvis_tb.kinds.actmax import DEFAULT_STEPS
from cnnvis_tb.kinds.saliency import SALIENCY_METHODS
from cnnvis_tb.progress import TrainingBar, fresh_run_dir, show_progress_logs

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataError(Exception):
    """The data asked for is not on disk (or not in the expected layout)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["imagefolder", "cifar10"], default="imagefolder",
                   help="imagefolder: DATA_ROOT/<class>/<image>; cifar10: DATA_ROOT/cifar-10-batches-py "
                   "(default: imagefolder)")
    p.add_argument("--data-root", required=True, metavar="DIR", help="where the data is (nothing is downloaded)")
    p.add_argument("--logdir", default="runs", help="parent folder of the runs (default: runs)")
    p.add_argument("--run-name", default=None,
                   help="sub-folder of this run (default: resnet18-<dataset>); if it already holds events, the first "
                        "free <name>-2, <name>-3, ... is used instead, so two trainings never mix in one run")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the shuffling and the augmentation")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the square training images in pixels (default: 32 for cifar10, 128 otherwise)")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate (default: 0.05)")
    p.add_argument("--every", type=int, default=None,
                   help="log every kind every N steps (default: about 12 logs over the run, 3 of actmax)")
    p.add_argument("--probe-size", type=int, default=8, help="probe images, taken from every class in turn")
    p.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=list(DEFAULT_KINDS), metavar="KIND",
                   help=f"visual kinds to log, among {', '.join(ALL_KINDS)} (default: {' '.join(DEFAULT_KINDS)})")
    p.add_argument("--actmax-steps", type=int, default=DEFAULT_STEPS,
                   help=f"gradient-ascent steps of each activation-maximization log (default: {DEFAULT_STEPS})")
    p.add_argument("--saliency-methods", nargs="+", choices=SALIENCY_METHODS, default=["vanilla"], metavar="METHOD",
                   help=f"saliency maps shown side by side when the saliency kind is logged, among "
                        f"{', '.join(SALIENCY_METHODS)} (default: vanilla)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "image_size", "probe_size", "every", "actmax_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")


def image_transforms(size: int, mean, std, *, cifar: bool) -> tuple[transforms.Compose, transforms.Compose]:
    """(training transform with augmentation, evaluation transform for the probe)."""
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if cifar:
        resize = [] if size == 32 else [transforms.Resize(size)]
        train = resize + [transforms.RandomCrop(size, padding=max(1, size // 8)), transforms.RandomHorizontalFlip()]
        return transforms.Compose(train + finish), transforms.Compose(resize + finish)
    train = [transforms.RandomResizedCrop(size, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip()]
    evaluation = [transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose(train + finish), transforms.Compose(evaluation + finish)


def load_data(dataset: str, root: Path, size: int) -> tuple[Dataset, Dataset, list[str], tuple, tuple]:
    """``(training set, probe source, class names, mean, std)``; raises DataError when the data is not there."""
    if dataset == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        train_tf, eval_tf = image_transforms(size, mean, std, cifar=True)
        try:
            train = torchvision.datasets.CIFAR10(root, train=True, transform=train_tf, download=False)
            probe_source = torchvision.datasets.CIFAR10(root, train=False, transform=eval_tf, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise DataError(
                f"CIFAR-10 not found in {root}: expected {root / 'cifar-10-batches-py'} holding data_batch_1 .. "
                "data_batch_5 and test_batch (the extracted 'CIFAR-10 python version' archive). This script "
                "downloads nothing; put the data there first or give --data-root"
            ) from e
        return train, probe_source, list(train.classes), mean, std

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder. An ImageFolder holds one sub-folder per class with "
                        "its images (root/cat/001.png, root/dog/001.jpg, ...); this script downloads nothing")
    train_tf, eval_tf = image_transforms(size, mean, std, cifar=False)
    try:
        train = torchvision.datasets.ImageFolder(root, transform=train_tf)
    except FileNotFoundError as e:  # torchvision: no class folder, or no image in them
        raise DataError(f"no usable images in {root} ({e}); an ImageFolder holds one sub-folder per class "
                        "with its images (root/cat/001.png, root/dog/001.jpg, ...)") from e
    if len(train.classes) < 2:
        raise DataError(f"{root} holds one class folder ({train.classes[0]!r}); a classifier needs at least two")
    # No held-out split here: the probe shows training images, without augmentation.
    probe_source = torchvision.datasets.ImageFolder(root, transform=eval_tf)
    return train, probe_source, list(train.classes), mean, std


def probe_indices(targets: list[int], count: int) -> list[int]:
    """Up to ``count`` indices taking each class in turn (class 0's first image, class 1's first, ...)."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [iter(by_class[c]) for c in sorted(by_class)]
    picks: list[int] = []
    while len(picks) < count and queues:
        for queue in list(queues):
            index = next(queue, None)
            if index is None:
                queues.remove(queue)
            elif len(picks) < count:
                picks.append(index)
    return picks


def resnet18(num_classes: int, *, small_images: bool) -> nn.Module:
    """torchvision's ResNet-18 without pretrained weights; with the CIFAR stem for small images."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if small_images:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def default_every(steps: int) -> dict[str, int]:
    """About 12 logs of the cheap kinds and 3 of activation maximization over the run."""
    base = max(1, steps // 12)
    return {"kernels": base, "histograms": base, "features": base, "gradcam": base, "actmax": max(1, steps // 3)}


def main(argv=None) -> float:
    """Train and log; returns the mean training loss of the last 20 steps."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    size = args.image_size or (32 if args.dataset == "cifar10" else 128)
    try:
        train, probe_source, classes, mean, std = load_data(args.dataset, Path(args.data_root), size)
    except DataError as e:
        parser.error(str(e))  # prints the message and exits with status 2

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = resnet18(len(classes), small_images=size <= 64).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=len(train) > args.batch_size,
                        num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))

    log_dir = Path(args.logdir) / (args.run_name or f"resnet18-{args.dataset}")
    fresh = fresh_run_dir(log_dir)
    if fresh != log_dir:
        print(f"{log_dir} already holds events of another training: logging to {fresh} instead")
        log_dir = fresh
    show_progress_logs()
    vis = VisLogger(
        model, log_dir,
        probe=Subset(probe_source, probe_indices(probe_source.targets, args.probe_size)),
        probe_size=args.probe_size,
        mean=mean, std=std, class_names=classes,
        kinds=args.kinds, every=args.every or default_every(args.steps),
        actmax_steps=args.actmax_steps,
        saliency_methods=args.saliency_methods,
    )
    start, step, recent = time.perf_counter(), 0, []
    bar = TrainingBar(args.steps, vis)
    while step < args.steps:
        for x, y in loader:
            if step >= args.steps:
                break
            model.train()
            loss = loss_fn(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            logged = vis.step(step)
            recent = (recent + [loss.item()])[-20:]
            if step % 10 == 0:
                vis.writer.add_scalar("train/loss", recent[-1], step)
            bar.step(step, recent[-1], logged=logged)
            step += 1
    bar.close()
    vis.log_now(args.steps)  # the final state, every kind
    vis.close()
    final_loss = sum(recent) / len(recent)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; "
          f"mean loss of the last {len(recent)} steps {final_loss:.3f}")
    print(f"logged to {log_dir}\nnow run:  tensorboard --logdir {args.logdir}   and open the 'CNN Vis' tab")
    return final_loss


if __name__ == "__main__":
    main()
