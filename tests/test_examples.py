"""The example scripts: ResNet-18 on a generated ImageFolder, and several demo runs into one folder."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _models import decode_png, read_events
from PIL import Image

from cnnvis_tb import VisLogger

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    """An example script as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_resnet():
    return _load("train_resnet")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """2 classes × 6 PNGs of 32×32: a coloured square on dark noise, red for one class and blue for the other."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (40, 60, 220)), ("red", (220, 50, 40))):
        (root / name).mkdir()
        for i in range(6):
            pixels = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
            x, y = rng.integers(2, 20, size=2)
            pixels[y : y + 10, x : x + 10] = colour
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


# ---------------------------------------------------------------------- train_resnet.py
def test_train_resnet_on_a_generated_image_folder(train_resnet, image_folder, tmp_path):
    loss = train_resnet.main([
        "--data-root", str(image_folder), "--logdir", str(tmp_path), "--run-name", "tiny", "--steps", "3",
        "--batch-size", "4", "--image-size", "16", "--every", "5", "--probe-size", "2", "--actmax-steps", "1",
        "--workers", "0", "--seed", "1", "--kinds", "kernels", "features", "gradcam", "actmax",
    ])
    assert math.isfinite(loss)
    acc = read_events(tmp_path / "tiny")
    tags = acc.Tags()["images"]
    assert {t.split("/")[1] for t in tags} == {"kernels", "features", "gradcam", "actmax"}
    # Grad-CAM on the last residual stage (still 2×2 at 16 px thanks to the CIFAR stem), for the 2 probe images.
    assert sorted(t for t in tags if t.startswith("cnnvis/gradcam/")) == [
        "cnnvis/gradcam/layer4/probe_000", "cnnvis/gradcam/layer4/probe_001"]
    assert [e.step for e in acc.Images("cnnvis/kernels/conv1/grid")] == [0, 3]  # the schedule, then the final state
    assert "train/loss" in acc.Tags()["scalars"]
    assert acc.Tags()["histograms"] == []  # not among --kinds
    # The probe has labels (from the dataset): a Grad-CAM strip holds the input plus 2 methods × 2 targets
    # (true and predicted), five panels side by side (three without labels).
    strip = decode_png(acc.Images("cnnvis/gradcam/layer4/probe_000")[-1].encoded_image_string)
    assert strip.shape[1] > 3.5 * strip.shape[0]


def test_probe_takes_each_class_in_turn(train_resnet):
    assert train_resnet.probe_indices([0, 0, 0, 1, 1, 2], 5) == [0, 3, 5, 1, 4]
    assert train_resnet.probe_indices([1, 1, 0], 8) == [2, 0, 1]


@pytest.mark.parametrize(
    ("layout", "dataset", "message"),
    [
        ("missing", "imagefolder", "is not a folder"),
        ("empty", "imagefolder", "no usable images in"),
        ("one-class", "imagefolder", "holds one class folder ('only'); a classifier needs at least two"),
        ("empty", "cifar10", "CIFAR-10 not found in"),
    ],
)
def test_train_resnet_says_clearly_when_the_data_is_not_there(train_resnet, tmp_path, capsys, layout, dataset,
                                                               message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "one-class":
        (root / "only").mkdir()
        Image.new("RGB", (8, 8)).save(root / "only" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        train_resnet.main(["--dataset", dataset, "--data-root", str(root), "--logdir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_train_resnet_as_a_program_exits_non_zero_without_data(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_resnet.py"), "--dataset", "cifar10", "--data-root", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 2
    assert f"CIFAR-10 not found in {tmp_path}" in run.stderr and "downloads nothing" in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------- compare_runs.py
@pytest.fixture
def compare_runs(monkeypatch):
    """compare_runs with a cheaper VisLogger inside train_shapes (fewer kinds, 2 probe images): this tests how
    the runs are laid out, not the default cost of every kind."""
    module = _load("compare_runs")
    load = module.load_train_shapes

    def cheap_train_shapes():
        train_shapes = load()
        cheap = {"kinds": ["kernels", "gradcam", "histograms"], "probe_size": 2}
        monkeypatch.setattr(train_shapes, "VisLogger", lambda *a, **k: VisLogger(
            *a, **{**k, **cheap, "probe_boxes": k["probe_boxes"][:2]}))  # the boxes of the 2 probe images
        return train_shapes

    monkeypatch.setattr(module, "load_train_shapes", cheap_train_shapes)
    return module


def test_compare_runs_trains_each_setting_into_one_folder(compare_runs, tmp_path):
    results = compare_runs.main(["--logdir", str(tmp_path), "--lrs", "0.05", "0.5", "--steps", "2", "--every", "1"])
    assert list(results) == ["lr0.05", "lr0.5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr0.05", "lr0.5"]
    runs = {name: read_events(tmp_path / name) for name in results}
    tags = {name: sorted(acc.Tags()["images"]) for name, acc in runs.items()}
    assert tags["lr0.05"] == tags["lr0.5"] and tags["lr0.05"]  # the same pictures ...
    grid = "cnnvis/kernels/features.0.0/grid"
    steps = {name: [e.step for e in acc.Images(grid)] for name, acc in runs.items()}
    assert steps["lr0.05"] == steps["lr0.5"] == [0, 1, 2]  # ... on the same steps

    def picture(name, tag, step):
        return decode_png(next(e for e in runs[name].Images(tag) if e.step == step).encoded_image_string)

    # One seed: the same probe images in every run (the input panel, left of each Grad-CAM strip) ...
    strip = "cnnvis/gradcam/features/probe_001"
    for step in (0, 2):
        first, second = picture("lr0.05", strip, step), picture("lr0.5", strip, step)
        width = first.shape[1] // 5
        assert np.array_equal(first[:, :width], second[:, :width])
    # ... and different learning rates: different training.
    assert not np.array_equal(picture("lr0.05", grid, 2), picture("lr0.5", grid, 2))


def test_compare_runs_plans_one_run_per_setting():
    module = _load("compare_runs")
    assert module.plan_runs([0.05, 0.5], "both") == [
        ("lr0.05", ["--lr", "0.05"]), ("lr0.05-aug", ["--lr", "0.05", "--augment"]),
        ("lr0.5", ["--lr", "0.5"]), ("lr0.5-aug", ["--lr", "0.5", "--augment"]),
    ]
    assert module.plan_runs([0.1], "on") == [("lr0.1-aug", ["--lr", "0.1", "--augment"])]


def test_compare_runs_refuses_to_mix_with_earlier_events(compare_runs, tmp_path, capsys):
    (tmp_path / "lr0.5").mkdir()
    (tmp_path / "lr0.5" / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        compare_runs.main(["--logdir", str(tmp_path), "--lrs", "0.05", "0.5", "--steps", "2"])
    assert exit_info.value.code == 2
    assert "lr0.5 already hold(s) events" in capsys.readouterr().err
    assert not (tmp_path / "lr0.05").exists()  # checked before the first run


@pytest.mark.parametrize(("lrs", "message"), [(["0.1", "0.1"], "holds a value twice"), (["0"], "must be > 0")])
def test_compare_runs_rejects_bad_learning_rates(compare_runs, tmp_path, capsys, lrs, message):
    with pytest.raises(SystemExit):
        compare_runs.main(["--logdir", str(tmp_path), "--lrs", *lrs])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- train_shapes.py (the offline demo)
def test_train_shapes_demo_learns_and_logs(tmp_path, capsys):
    demo = _load("train_shapes")
    # 250 steps: at 200 the last pointing game is 8/8 on one CPU and 7/8 on another (the float order of its kernels)
    accuracy = demo.main(["--logdir", str(tmp_path), "--run-name", "demo", "--steps", "250", "--seed", "1",
                          "--kinds", "gradcam", "kernels", "--every", "50"])
    assert accuracy > 0.6  # four classes: chance is 0.25
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    acc = read_events(tmp_path / "demo")
    assert [e.step for e in acc.Images("cnnvis/gradcam/features/probe_000")] == [0, 50, 100, 150, 200, 250]
    assert "train/loss" in acc.Tags()["scalars"] and "test/accuracy" in acc.Tags()["scalars"]
    # The demo passes its shapes' boxes: Grad-CAM's pointing game climbs from about chance to (nearly) every image.
    pointing = [e.value for e in acc.Scalars("cnnvis/metrics/gradcam/features/pointing/gradcam/true")]
    assert len(pointing) == 6 and pointing[-1] >= 0.9 and pointing[-1] >= pointing[0] + 0.25


# ---------------------------------------------------------------------- custom_kind.py (a kind of the user's own)
def test_custom_kind_example_logs_its_kind_beside_the_built_in_ones(tmp_path, capsys):
    example = _load("custom_kind")
    log_dir = example.main(["--logdir", str(tmp_path), "--steps", "20"])
    acc = read_events(log_dir)
    layers = [t.split("/")[2] for t in acc.Tags()["images"] if t.startswith("cnnvis/channel_means/")]
    assert layers, "the custom kind logged no picture"
    steps = [e.step for e in acc.Images(f"cnnvis/channel_means/{layers[0]}/all")]
    assert steps == [0, 5, 10, 15, 20]
    strip = decode_png(acc.Images(f"cnnvis/channel_means/{layers[0]}/all")[-1].encoded_image_string)
    assert strip.shape[0] == 8 * 8  # one 8-pixel row per probe image
    assert {t.split("/")[1] for t in acc.Tags()["images"]} == {"gradcam", "features", "channel_means"}
    assert f"cnnvis/metrics/channel_means/{layers[0]}/dead_fraction" in acc.Tags()["scalars"]
    assert "Channel means" in capsys.readouterr().out


def test_train_shapes_into_a_used_run_folder_does_not_mix_two_trainings(tmp_path, capsys):
    demo = _load("train_shapes")
    options = ["--logdir", str(tmp_path), "--run-name", "demo", "--kinds", "kernels", "--every", "10"]
    demo.main([*options, "--steps", "30"])
    demo.main([*options, "--steps", "10"])  # the same command again, shorter
    out = capsys.readouterr()
    assert f"{tmp_path / 'demo'} already holds events of another training: logging to {tmp_path / 'demo-2'}" in out.out
    assert [e.step for e in read_events(tmp_path / "demo").Images("cnnvis/kernels/features.0.0/grid")] == [0, 10, 20, 30]
    assert [e.step for e in read_events(tmp_path / "demo-2").Images("cnnvis/kernels/features.0.0/grid")] == [0, 10]
    assert "training: 100%" in out.err and "logged=@" in out.err  # the progress bar names the logging steps


def test_the_training_bar_reports_the_kinds_of_each_logging_step(tmp_path, capsys):
    import torch

    from cnnvis_tb.progress import TrainingBar

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    with VisLogger(model, tmp_path, probe=torch.rand(2, 3, 8, 8), kinds=["kernels", "histograms"],
                   every={"kernels": 2, "histograms": 3}) as vis:
        bar = TrainingBar(4, vis, mininterval=0)
        for step in range(4):
            bar.step(step, 1.0 / (step + 1), logged=vis.step(step))
            if step == 3:
                assert bar.logged.startswith("@3 histograms ") and "kernels" not in bar.logged
        bar.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=0.250" in err


def test_under_async_logging_the_bar_also_shows_the_workers_time(tmp_path, capsys):
    """The training thread's share of an async logging step is about 0 ms: alone it read as if nothing ran."""
    import torch

    from cnnvis_tb.progress import TrainingBar

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    with VisLogger(model, tmp_path, probe=torch.rand(2, 3, 8, 8), kinds=["kernels"], every=2,
                   async_logging=True) as vis:
        bar = TrainingBar(3, vis, mininterval=0)
        bar.step(0, 1.0, logged=vis.step(0))
        assert bar.logged.startswith("@0 kernels ")
        vis.wait()
        bar.step(1, 0.5, logged=vis.step(1))
        assert bar.rendered.startswith("rendered kernels ") and "; rendered kernels" in bar.bar.postfix
        bar.step(2, 0.3, logged=vis.log_now(2))  # the worker is done before the bar hears of the step
        assert bar.logged.startswith("@2 kernels ") and bar.rendered.startswith("rendered kernels ")
        bar.close()


def test_progress_messages_get_a_line_of_their_own_above_the_bar(capsys):
    """In a log file (no terminal) too: a plain stream handler would append the message to the bar's line."""
    import logging

    from cnnvis_tb.progress import TrainingBar, show_progress_logs

    logger = logging.getLogger("cnnvis_tb")
    saved, level = logger.handlers[:], logger.level
    logger.handlers.clear()
    try:
        show_progress_logs()
        bar = TrainingBar(3, mininterval=0)
        bar.step(0, 1.0)
        logger.info("step 0: activation maximization of 16 channels")
        bar.step(1, 0.5)
        bar.close()
    finally:
        logger.handlers[:] = saved
        logger.setLevel(level)
    lines = [line for line in capsys.readouterr().err.split("\n") if "activation maximization" in line]
    assert len(lines) == 1 and lines[0].split("\r")[-1] == "cnnvis_tb: step 0: activation maximization of 16 channels"
