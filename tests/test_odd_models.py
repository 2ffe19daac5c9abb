"""Odd models and inputs: tuple/dict outputs, torch.compile, channels-last, AMP, thread count."""

from __future__ import annotations

import pytest
import torch
from _models import TinyCNN, image_at, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger, grad_cam
from cnnvis_tb.kinds import ALL_KINDS


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyCNN()

    def forward(self, x):
        return {"embedding": x.mean(dim=(1, 2, 3)), "class_scores": self.backbone(x)}


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyCNN()

    def forward(self, x):
        return self.backbone(x), x.mean()


def test_dict_output_needs_and_takes_a_selector(tmp_path):
    torch.manual_seed(0)
    probe, labels = make_batch(1, n=2)
    with pytest.raises(ValueError, match=r"could not find class scores \[N, num_classes\].*output_selector"):
        VisLogger(DictOut(), tmp_path, probe=probe)  # 'embedding' is [N], not scores
    with VisLogger(DictOut(), tmp_path, probe=probe, probe_labels=labels, every=1, strict=True, actmax_steps=2,
                   output_selector=lambda out: out["class_scores"]) as vis:
        assert vis.num_classes == 4 and vis.layers["gradcam"] == ["backbone.body"]
        vis.step(0)
    assert "cnnvis/gradcam/backbone.body/probe_001" in read_events(tmp_path).Tags()["images"]


def test_tuple_output_uses_the_first_tensor(tmp_path):
    torch.manual_seed(0)
    probe, labels = make_batch(1, n=2)
    with VisLogger(TupleOut(), tmp_path, probe=probe, probe_labels=labels, every=1, kinds=["gradcam"],
                   strict=True) as vis:
        vis.step(0)
    assert len(read_events(tmp_path).Tags()["images"]) == 2


def test_compiled_model_is_logged_through_the_original_module(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    compiled = torch.compile(model, backend="eager")
    probe, labels = make_batch(1, n=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with VisLogger(compiled, tmp_path, probe=probe, probe_labels=labels, every=1, strict=True, actmax_steps=2) as vis:
        assert vis.layers["gradcam"] == ["body"]
        for step in range(2):
            x, y = make_batch(10 + step)
            loss = nn.functional.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            vis.step(step)
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [0, 1]


def test_channels_last_model_and_probe(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    images, labels = make_batch(1, n=3)
    plain = grad_cam(model, images, "body", targets=labels)
    model = model.to(memory_format=torch.channels_last)
    cl = images.to(memory_format=torch.channels_last)
    assert torch.allclose(grad_cam(model, cl, "body", targets=labels), plain, atol=1e-5)
    with VisLogger(model, tmp_path, probe=cl, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                   actmax_steps=2) as vis:
        vis.step(0)
    assert image_at(read_events(tmp_path), "cnnvis/kernels/stem.0/grid").std() > 5


def test_bf16_model_under_autocast(tmp_path):
    """A model kept in bfloat16 and trained under autocast: every kind logs; Grad-CAM maths runs in float32."""
    torch.manual_seed(0)
    model = TinyCNN().to(torch.bfloat16)
    probe, labels = make_batch(1, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = grad_cam(model, probe, "body", targets=labels)
        with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                       actmax_steps=2) as vis:
            vis.step(1)  # every kind due
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    acc = read_events(tmp_path)
    kinds = {t.split("/")[1] for t in acc.Tags()["images"]}
    assert kinds == set(ALL_KINDS) - {"histograms", "health"} and acc.Tags()["histograms"]  # not images
    assert any(t.startswith("cnnvis/metrics/health/") for t in acc.Tags()["scalars"])


def test_thread_count_restored(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with VisLogger(TinyCNN(), tmp_path, probe=make_batch(1, n=2)[0], every=1, strict=True, actmax_steps=2) as vis:
            vis.step(0)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
