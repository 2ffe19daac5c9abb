"""The CAM family in the logger: cam_methods, cam_batch_size, cam_scale, read back from the event files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import TinyCNN, hook_counts, image_at, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger, cam
from cnnvis_tb.kinds.cam_methods import METHODS
from cnnvis_tb.render import denormalize, fit, overlay_heatmap, to_uint8

GRADIENT_METHODS = [m for m, spec in METHODS.items() if spec.gradients]
PANEL = 98  # 96 px panels, 2 px apart


def _trained_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x, y = make_batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_every_method_is_shown_and_equals_the_functional_map(tmp_path):
    model = _trained_tiny()
    probe, labels = make_batch(50, n=3)
    methods = list(METHODS)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                   cam_methods=methods, cam_batch_size=7, layers={"gradcam": ["body"]}) as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    shown = denormalize(probe, None, None)
    for i in range(3):
        strip = image_at(acc, f"cnnvis/gradcam/body/probe_{i:03d}").astype(int)
        assert strip.shape[1] == 2 + (1 + 2 * len(methods)) * PANEL  # input, then each method x (true, pred)
    pred = model.eval()(probe).argmax(1)
    model.train()
    for j, method in enumerate(methods):
        for k, targets in enumerate((labels, pred)):
            maps = cam(model, probe, "body", targets, method, batch_size=7)
            expected = to_uint8(fit(overlay_heatmap(shown, maps), 96, 96)).permute(0, 2, 3, 1).numpy().astype(int)
            column = 1 + 2 * j + k
            for i in range(3):
                strip = image_at(acc, f"cnnvis/gradcam/body/probe_{i:03d}").astype(int)
                panel = strip[2:98, 2 + column * PANEL: column * PANEL + 98]
                assert np.abs(panel - expected[i]).mean() < 1.0, (method, k, i)


def test_gradient_methods_share_one_forward_and_one_backward(tmp_path, monkeypatch):
    model = _trained_tiny(1)
    probe, labels = make_batch(51, n=2)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    import cnnvis_tb.probe_pass as probe_pass

    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(probe_pass.torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                   cam_methods=GRADIENT_METHODS + ["eigencam"], cam_metrics=False) as vis:
        forwards.clear()
        vis.step(0)
    assert len(forwards) == 1
    pred = model.eval()(probe).argmax(1)
    assert len(calls) == (1 if torch.equal(pred, labels) else 2)  # one backward per distinct target set


def test_run_scale_shows_a_fading_map_and_image_scale_does_not(tmp_path):
    probe, labels = make_batch(52, n=2)
    panels = {}
    for scale in ("image", "run"):
        fading = _trained_tiny(2)
        with VisLogger(fading, tmp_path / scale, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                       cam_methods=["gradcam"], cam_scale=scale, every=1) as vis:
            vis.step(0)
            with torch.no_grad():  # the class evidence halves: every map's values halve, their shape stays
                fading.head.weight.mul_(0.5)
            vis.step(1)
        acc = read_events(tmp_path / scale)
        strip = [image_at(acc, "cnnvis/gradcam/body/probe_000", step=s).astype(int) for s in (0, 1)]
        panels[scale] = [s[2:98, 2 + PANEL: 2 * PANEL] for s in strip]
    image0, image1 = panels["image"]
    assert np.abs(image0 - image1).mean() < 1.0  # min-max scaling hides the fading
    run0, run1 = panels["run"]
    assert np.abs(run0 - run1).mean() > 5.0  # one scale over the run shows it
    heat = [(p[..., 0] - p[..., 2]).mean() for p in (run0, run1)]  # jet: red - blue grows with the map's value
    assert heat[1] < heat[0] - 10  # dimmer at step 1


def test_training_is_bit_identical_with_every_cam_method(tmp_path):
    def train(log_dir=None):
        torch.manual_seed(7)
        model = TinyCNN()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe, labels = make_batch(60, n=2)
        vis = None if log_dir is None else VisLogger(
            model, log_dir, probe=probe, probe_labels=labels, kinds=["gradcam"], every=1, strict=True,
            cam_methods=list(METHODS), cam_batch_size=5, cam_scale="run")
        for step in range(6):
            x, y = make_batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if vis is not None:
                vis.step(step)  # between backward and step: .grad must be untouched
            opt.step()
        if vis is not None:
            vis.close()
        return model.state_dict(), opt.state_dict()["state"], torch.get_rng_state(), hook_counts(model)

    (m0, o0, r0, h0), (m1, o1, r1, h1) = train(), train(tmp_path)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(o0[k][f], o1[k][f]) for k in o0 for f in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(r0, r1) and h0 == h1


def test_bad_cam_options_fail_in_the_constructor(tmp_path):
    probe, labels = make_batch(61, n=2)
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcam\+' \(did you mean 'gradcam\+\+' or 'gradcam'"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, cam_methods=["gradcam+"])
    with pytest.raises(ValueError, match=r"cam_scale must be one of \('image', 'run'\)"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, cam_scale="global")
    with pytest.raises(ValueError, match=r"cam_batch_size must be a positive int"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, cam_batch_size=0)
    with pytest.raises(ValueError, match=r"cam_scale must be one of"):  # also when the gradcam kind is not logged
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=["kernels"], cam_scale="global")
    with pytest.raises(ValueError, match=r"top_k must be a positive int"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=["kernels"], top_k=0)

    class NoGapHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    with pytest.raises(ValueError, match=r"CAM needs global average pooling.*Use method='gradcam'"):
        VisLogger(NoGapHead(), tmp_path, probe=probe, kinds=["gradcam"], cam_methods=["cam"])


def test_costly_perturbation_methods_say_what_a_logging_step_costs(tmp_path):
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1024, 3, padding=1)
            self.fc = nn.Linear(1024, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    probe = torch.randn(4, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"Score-CAM on layers \['conv'\] cost up to 8,192 perturbed images "
                                            r"\(128 forward passes of up to 64\) per logging step"):
        VisLogger(Wide(), tmp_path, probe=probe, probe_labels=[0, 1, 2, 0], kinds=["gradcam"],
                  cam_methods=["scorecam"]).close()


def test_a_frozen_backbone_still_gets_every_gradient_method(tmp_path):
    from cnnvis_tb import cam

    model = _trained_tiny(4)
    model.requires_grad_(False)  # everything frozen: the activations carry no graph of their own
    probe, labels = make_batch(53, n=2)
    for method in GRADIENT_METHODS + ["fullgrad"]:
        maps = cam(model, probe, "body", labels, method)
        assert torch.isfinite(maps).all() and maps.amax() > 0, method
    assert not any(p.requires_grad for p in model.parameters())
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True) as vis:
        vis.step(0)
    assert not any(p.requires_grad for p in model.parameters())


def test_logged_fullgrad_does_not_depend_on_in_place_relus(tmp_path):
    """FullGrad's bias terms use the gradient of each bias layer's own output, taken before the ReLU(inplace=True)
    after it: the logged strip of a model equals that of its copy with out-of-place ReLUs."""
    import copy

    model = _trained_tiny(2)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    probe, labels = make_batch(51, n=2)
    strips = []
    for net, run in ((model, "inplace"), (twin, "out_of_place")):
        with VisLogger(net, tmp_path / run, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                       cam_methods=["fullgrad"], layers={"gradcam": ["body"]}) as vis:
            vis.step(0)
        strips.append(image_at(read_events(tmp_path / run), "cnnvis/gradcam/body/probe_000").astype(int))
    assert np.abs(strips[0] - strips[1]).max() <= 1
