"""Grad-CAM / Grad-CAM++: agreement with a straightforward reference, localization, edge cases."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import TinyCNN, hook_counts, image_at, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger, grad_cam
from cnnvis_tb.kinds.gradcam import cam_from_gradients, normalize_maps


def reference_grad_cam(model, images, layer_name, targets, method):
    """Textbook Grad-CAM written plainly: hook + backward on a private copy of the model, numpy-free."""
    model = copy.deepcopy(model).eval()
    layer = dict(model.named_modules())[layer_name]
    saved = {}

    def hook(_m, _i, out):
        out = out.clone()  # the layer's output before any in-place op that follows it
        out.retain_grad()
        saved["a"] = out
        return out

    layer.register_forward_hook(hook)
    scores = model(images)
    scores[torch.arange(len(targets)), targets].sum().backward()
    a, g = saved["a"].detach(), saved["a"].grad
    if method == "gradcam":
        w = g.mean(dim=(2, 3), keepdim=True)
    else:
        alpha_num = g**2
        alpha_den = 2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3
        alpha = torch.where(alpha_den != 0, alpha_num / torch.where(alpha_den != 0, alpha_den, 1), 0)
        w = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((w * a).sum(1))
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    out = []
    for m in cam:
        span = m.max() - m.min()
        out.append((m - m.min()) / span if span > 1e-7 else torch.zeros_like(m))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["body", "body.3", "stem"])
def test_matches_reference(method, layer):
    torch.manual_seed(3)
    model = TinyCNN().train()
    images, labels = make_batch(5, n=6, h=20, w=28)  # non-square on purpose
    ours = grad_cam(model, images, layer, targets=labels, method=method)
    ref = reference_grad_cam(model, images, layer, labels, method)
    assert ours.shape == (6, 20, 28) and ours.dtype == torch.float32 and not ours.requires_grad
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert model.training  # restored


def test_targets_forms():
    torch.manual_seed(0)
    model = TinyCNN()
    images, _ = make_batch(1, n=4)
    pred = model.eval()(images).argmax(1)
    model.train()
    by_none = grad_cam(model, images, "body")
    by_list = grad_cam(model, images, model.body, targets=pred.tolist())
    assert torch.equal(by_none, by_list)
    by_int = grad_cam(model, images, "body", targets=2)
    assert torch.allclose(by_int, reference_grad_cam(model, images, "body", torch.full((4,), 2), "gradcam"), atol=1e-4)


def test_per_image_targets_differ():
    torch.manual_seed(0)
    model = TinyCNN()
    images, _ = make_batch(1, n=2)
    a = grad_cam(model, images, "body", targets=[0, 1])
    b = grad_cam(model, images, "body", targets=[1, 0])
    single = [grad_cam(model, images[i : i + 1], "body", targets=[t]) for i, t in enumerate([0, 1])]
    assert torch.allclose(a, torch.cat(single), atol=1e-5)
    assert not torch.allclose(a, b)


class EvidenceModel(nn.Module):
    """Class 1's score is the mean of a 'red detector' map; class 0's is its negative. Evidence sits where red is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0  # red
            self.conv.weight[1, 2] = 1.0  # blue
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def _red_square_images(h=24, w=32):
    images = torch.zeros(2, 3, h, w)
    images[0, 0, 4:10, 20:28] = 1.0  # red square, top right
    images[1, 0, 14:20, 2:8] = 1.0  # red square, bottom left
    images[:, 1] = 0.3  # green background: no evidence for either class
    return images


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_peaks_where_the_evidence_is(method):
    model = EvidenceModel()
    images = _red_square_images()
    maps = grad_cam(model, images, "conv", targets=1, method=method)
    for m, (y0, y1, x0, x1) in zip(maps, [(4, 10, 20, 28), (14, 20, 2, 8)], strict=True):
        assert m[y0:y1, x0:x1].min() > 0.9
        outside = m.clone()
        outside[y0:y1, x0:x1] = 0
        assert outside.max() < 0.9


def test_logged_overlay_is_hot_at_the_evidence(tmp_path):
    model = EvidenceModel()
    images = _red_square_images(32, 32)
    with VisLogger(model, tmp_path, probe=images, probe_labels=[1, 1], kinds=["gradcam"], every=1, strict=True,
                   layers={"gradcam": ["conv"]}, class_names=["blue", "red"]) as vis:
        vis.step(0)
    strip = image_at(read_events(tmp_path), "cnnvis/gradcam/conv/probe_000").astype(int)
    # panels are 96 px (32 px upscaled ×3), 2 px apart; panel 1 is Grad-CAM of the true class
    panel = strip[2:98, 2 + 98 : 98 + 98]
    hot = panel[4 * 3 : 10 * 3, 20 * 3 : 28 * 3]
    cold = panel[24 * 3 :, : 8 * 3]
    # jet: hot = red, cold = blue; compare red-minus-blue
    assert (hot[..., 0] - hot[..., 2]).mean() > 100
    assert (cold[..., 0] - cold[..., 2]).mean() < -50


def test_a_layer_followed_by_an_inplace_relu():
    """TinyCNN's stem is conv, BN, ReLU(inplace=True): Grad-CAM of the BN still gets its activations and gradients."""
    torch.manual_seed(0)
    model = TinyCNN()
    images, labels = make_batch(1)
    maps = grad_cam(model, images, "stem.1", targets=labels)
    assert maps.shape == (8, 16, 16) and torch.isfinite(maps).all() and maps.amax() == 1.0


def test_all_zero_map_gives_zeros_not_nan():
    model = EvidenceModel()
    images = torch.zeros(1, 3, 8, 8)  # no red, no blue: no evidence anywhere
    maps = grad_cam(model, images, "conv", targets=1)
    assert torch.isfinite(maps).all() and maps.abs().max() == 0


def test_normalize_maps_and_gradcampp_zero_denominator():
    a = torch.zeros(1, 2, 3, 3)
    g = torch.zeros(1, 2, 3, 3)
    assert torch.equal(cam_from_gradients(a, g, "gradcam++"), torch.zeros(1, 3, 3))
    m = normalize_maps(torch.tensor([[[0.0, 2.0], [1.0, 4.0]]]))
    assert torch.allclose(m, torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]))


def test_model_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = TinyCNN().train()
    state = copy.deepcopy(model.state_dict())
    hooks = hook_counts(model)
    rng = torch.get_rng_state()
    grad_cam(model, make_batch(1)[0], "body", method="gradcam++")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert hook_counts(model) == hooks and model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_errors():
    model = TinyCNN()
    images, _ = make_batch(1)
    with pytest.raises(ValueError, match="unknown method"):
        grad_cam(model, images, "body", method="cam")
    with pytest.raises(ValueError, match=r"did you mean 'body'"):
        grad_cam(model, images, "bdy")
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, images, "body", targets=9)
    with pytest.raises(ValueError, match="one class per image"):
        grad_cam(model, images, "body", targets=[0, 1])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        grad_cam(model, images[0], "body")
    with pytest.raises(ValueError, match="spatial map"):
        grad_cam(model, images, "head")


def test_tuple_output_model_with_selector():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def forward(self, x):
            return {"aux": torch.zeros(1), "logits": self.net(x)}

    torch.manual_seed(0)
    model = Two()
    images, labels = make_batch(1)
    via_dict = grad_cam(model, images, "net.body", targets=labels)
    direct = grad_cam(model.net, images, "body", targets=labels)
    assert torch.equal(via_dict, direct)
    picked = grad_cam(model, images, "net.body", targets=labels, output_selector=lambda out: out["logits"])
    assert torch.equal(picked, direct)
    assert np.isfinite(picked.numpy()).all()
