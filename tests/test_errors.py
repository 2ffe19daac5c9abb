"""Bad input fails early, in the constructor, with a message that names the problem and the fix."""

from __future__ import annotations

import os

import pytest
import torch
from _models import TinyCNN, make_batch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import VisLogger

PROBE, LABELS = make_batch(0, n=4)


def make(tmp_path, **overrides):
    kwargs = {"probe": PROBE, "probe_labels": LABELS}
    kwargs.update(overrides)
    model = kwargs.pop("model", None) or TinyCNN()
    log_dir = kwargs.pop("log_dir", tmp_path)
    return VisLogger(model, log_dir, **kwargs)


CASES = [
    ("unknown layer", {"layers": ["body.03"]}, ValueError, r"unknown layer 'body.03': did you mean 'body.3', 'body.0', 'body.5'\? \(names come from model.named_modules"),
    ("unknown layer for a kind", {"layers": {"gradcam": ["bodi"]}}, ValueError, r"did you mean 'body'"),
    ("kernels need a conv", {"layers": {"kernels": ["body.1"]}}, ValueError,
     r"'body.1' is a BatchNorm2d, not a 2-D convolution; kernel grids need a Conv2d, e\.g\. 'body.3', 'body.0'"),
    ("layers for an unknown kind", {"layers": {"gradcam++": ["body"]}}, ValueError, r"unknown kind 'gradcam\+\+'"),
    ("probe rank", {"probe": PROBE[0]}, ValueError,
     r"probe must be \[N, C, H, W\]; got shape \[3, 16, 16\] \(one image\? use probe.unsqueeze\(0\)\)"),
    ("probe channels", {"probe": PROBE[:, :1]}, ValueError,
     r"probe has 1 channels but the model's first convolution expects 3: expected \[N, 3, H, W\], got \[4, 1, 16, 16\]"),
    ("probe dtype", {"probe": (PROBE * 255).to(torch.uint8)}, TypeError, r"floating-point.*images.float\(\) / 255"),
    ("probe device", {"probe": PROBE.to("meta")}, ValueError, r"'meta' device"),
    ("probe empty", {"probe": PROBE[:0], "probe_labels": None}, ValueError, r"N >= 1, got N = 0"),
    ("probe NaN", {"probe": PROBE.clone().fill_(float("nan"))}, ValueError, r"NaN or infinite"),
    ("labels length", {"probe_labels": [0, 1]}, ValueError, r"one class per probe image: expected 4, got 2"),
    ("labels float", {"probe_labels": [0.0, 1.0, 2.0, 3.0]}, TypeError, r"integer class indices"),
    ("class out of range", {"probe_labels": [7, 1, 9, 7]}, ValueError,  # each bad class once
     r"probe_labels hold classes \[7, 9\] out of range: the model outputs 4 classes \(valid labels are 0..3\)"),
    ("one class out of range", {"probe_labels": [0, 1, 2, 7]}, ValueError,
     r"probe_labels hold classes \[7\] out of range: the model outputs 4 classes \(valid labels are 0..3\)"),
    ("class names length", {"class_names": ["a", "b"]}, ValueError, r"class_names has 2 names but the model outputs 4"),
    ("mean length", {"mean": [0.5, 0.5]}, ValueError, r"mean must have one value per input channel: expected 3, got 2"),
    ("std length", {"std": [0.5]}, ValueError, r"std must have one value per input channel: expected 3, got 1"),
    ("std zero", {"std": [0.5, 0.0, 0.5]}, ValueError, r"std values must be > 0"),
    ("every zero", {"every": 0}, ValueError, r"must be >= 1 \(steps between logs\), got 0"),
    ("every negative for a kind", {"every": {"gradcam": -5}}, ValueError, r"every\['gradcam'\] must be >= 1"),
    ("every float", {"every": 2.5}, TypeError, r"every must be a positive int or a mapping"),
    ("every unknown kind", {"every": {"gradcam++": 10}}, ValueError, r"unknown kind 'gradcam\+\+' \(did you mean 'gradcam'\?\)"),
    ("unknown kind", {"kinds": ["kernels", "histogram"]}, ValueError, r"unknown kind 'histogram' \(did you mean 'histograms'"),
    ("top_k", {"top_k": 0}, ValueError, r"top_k must be a positive int"),
    ("actmax channel", {"actmax_channels": {"body.3": [99]}}, ValueError,
     r"actmax channel 99 out of range: layer 'body.3' has 16 channels"),
    ("no destination", {"log_dir": None}, ValueError, r"give log_dir .* or writer"),
]


@pytest.mark.parametrize("name,kwargs,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(tmp_path, name, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        make(tmp_path, **kwargs)


def test_probe_the_model_cannot_take_says_what_was_given(tmp_path):
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 14 * 14, 4)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(ValueError, match=r"could not run on the probe of shape \[4, 3, 20, 20\].*as the model sees it"):
        VisLogger(Fixed(), tmp_path, probe=torch.randn(4, 3, 20, 20))


def test_model_without_convolution(tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match=r"Sequential has no 2-D convolution \(nn.Conv2d\)"):
        VisLogger(mlp, tmp_path, probe=PROBE)


def test_not_a_module(tmp_path):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        VisLogger(lambda x: x, tmp_path, probe=PROBE)


def test_log_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"log_dir .* cannot be created .*choose a writable folder"):
        make(tmp_path, log_dir=blocker / "run")


def test_log_dir_not_writable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: root may write into any folder, so a read-only log_dir cannot be simulated")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"log_dir .* is not writable; choose a writable folder"):
        make(tmp_path, log_dir=locked)


def test_closed_writer(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.close()
    with pytest.raises(ValueError, match=r"writer is already closed; pass an open SummaryWriter or a log_dir"):
        VisLogger(TinyCNN(), writer=writer, probe=PROBE)


def test_both_log_dir_and_writer(tmp_path):
    writer = SummaryWriter(tmp_path)
    with pytest.raises(ValueError, match="either log_dir or writer"):
        VisLogger(TinyCNN(), tmp_path, writer=writer, probe=PROBE)
    writer.close()


def test_bad_step_and_use_after_close(tmp_path):
    vis = make(tmp_path, kinds=["kernels"])
    with pytest.raises(ValueError, match=r"global_step must be an int >= 0, got -1"):
        vis.log_now(-1)
    with pytest.raises(ValueError, match="unknown kind"):
        vis.log_now(0, kinds=["kernel"])
    vis.close()
    assert vis.step(0) is False
    with pytest.raises(RuntimeError, match="closed"):
        vis.log_now(0)
