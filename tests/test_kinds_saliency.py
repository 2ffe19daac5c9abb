"""Saliency methods: vanilla gradient, SmoothGrad and guided backpropagation, against references computed by hand."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import TinyCNN, image_at, make_batch, read_events, tiny_logger
from torch import nn

from cnnvis_tb import VisLogger, grad_cam, saliency
from cnnvis_tb.kinds import saliency as saliency_module
from cnnvis_tb.kinds.saliency import input_gradients, saliency_from_gradients
from cnnvis_tb.render import colorize, fit, to_uint8


class FunctionalReLUs(nn.Module):
    """ReLUs called three ways: module (in place), F.relu, and the tensor method."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = F.relu(self.c2(x)).relu()
        return self.head(x.mean(dim=(2, 3)))


class _HandGuided(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) & (g > 0), g, torch.zeros_like(g))


class HandGuidedTiny(nn.Module):
    """TinyCNN's computation written out with a hand-made guided ReLU: the reference for guided backprop."""

    def __init__(self, tiny: TinyCNN):
        super().__init__()
        self.tiny = tiny

    def forward(self, x):
        t = self.tiny
        x = _HandGuided.apply(t.stem[1](t.stem[0](x)))
        x = _HandGuided.apply(t.body[1](t.body[0](x)))
        x = _HandGuided.apply(t.body[4](t.body[3](x)))
        return t.head(x.mean(dim=(2, 3)))


def _gradient(model, x, targets):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), [x])
    return g


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_vanilla_is_the_input_gradients_magnitude(tiny):
    x, labels = make_batch(1)
    maps = saliency(tiny, x, labels)
    expected = _gradient(tiny, x, labels).abs().amax(dim=1)
    lo, hi = expected.flatten(1).amin(dim=1).view(-1, 1, 1), expected.flatten(1).amax(dim=1).view(-1, 1, 1)
    expected = (expected - lo) / (hi - lo)  # each map scaled to [0, 1] by its own min and max
    assert maps.shape == (8, 16, 16) and torch.allclose(maps, expected, atol=1e-5)


def test_guided_backprop_matches_a_hand_written_guided_network(tiny):
    x, labels = make_batch(2)
    with torch.no_grad():
        assert torch.allclose(HandGuidedTiny(tiny)(x), tiny(x))
    reference = _gradient(HandGuidedTiny(tiny), x, labels)
    grads, used = input_gradients(tiny, x, labels, "guided")
    assert torch.equal(used, labels) and torch.allclose(grads, reference, atol=1e-6)
    assert not torch.allclose(grads, _gradient(tiny, x, labels), atol=1e-4)  # it is not the vanilla gradient
    assert torch.allclose(saliency(tiny, x, labels, method="guided"), saliency_from_gradients(reference), atol=1e-5)


def test_guided_backprop_reaches_relus_called_as_functions_and_methods():
    torch.manual_seed(0)
    model = FunctionalReLUs().eval()
    x, labels = make_batch(3)
    x = x[:, :3]
    hand = copy.deepcopy(model)

    def guided_forward(inp):
        h = _HandGuided.apply(hand.c1(inp))
        h = _HandGuided.apply(_HandGuided.apply(hand.c2(h)))
        return hand.head(h.mean(dim=(2, 3)))

    class Wrapped(nn.Module):
        def forward(self, inp):
            return guided_forward(inp)

    grads, _ = input_gradients(model, x, labels, "guided")
    assert torch.allclose(grads, _gradient(Wrapped(), x, labels % 4), atol=1e-6)
    # after the pass, ReLUs are plain again (the mode is gone): the vanilla gradient is unchanged
    assert torch.allclose(input_gradients(model, x, labels, "vanilla")[0], _gradient(model, x, labels))


class EveryReLUForm(nn.Module):
    """The remaining ways to call a ReLU: torch.relu, torch.relu_, F.relu_, Tensor.relu_, and input= keywords."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(6))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        forms = [lambda h: torch.relu(h), lambda h: torch.relu_(h), lambda h: F.relu_(h), lambda h: h.relu_(),
                 lambda h: F.relu(input=h), lambda h: torch.relu(input=h)]
        for conv, form in zip(self.convs, forms, strict=True):
            x = form(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def test_guided_backprop_reaches_every_relu_form():
    torch.manual_seed(0)
    model = EveryReLUForm().eval()
    x, labels = make_batch(8)

    class Hand(nn.Module):
        def forward(self, h):
            for conv in model.convs:
                h = _HandGuided.apply(conv(h))
            return model.head(h.mean(dim=(2, 3)))

    grads, _ = input_gradients(model, x, labels, "guided")
    assert torch.allclose(grads, _gradient(Hand(), x, labels), atol=1e-6)


def test_guided_relu_passes_back_zero_where_it_was_off_even_for_inf_gradients():
    from cnnvis_tb.kinds.saliency import _GuidedReLU

    x = torch.tensor([-1.0, 2.0, 3.0, -4.0], requires_grad=True)
    (g,) = torch.autograd.grad(_GuidedReLU.apply(x), [x], torch.tensor([float("inf"), -1.0, 5.0, float("nan")]))
    assert g.tolist() == [0.0, 0.0, 5.0, 0.0]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_guided_backprop_refuses_models_it_cannot_follow():
    class SideEffect(TinyCNN):
        def forward(self, x):  # uses the in-place ReLU's side effect, not its return value
            x = self.stem[1](self.stem[0](x))
            self.stem[2](x)
            x = self.body(x)
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    x, _ = make_batch(9, n=2)
    with pytest.raises(ValueError, match="outputs change when its ReLUs are guided"):
        saliency(SideEffect(), x, method="guided")
    scripted = nn.Sequential(nn.Conv2d(3, 4, 3), torch.jit.script(nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"inside TorchScript modules \(1\)"):
        saliency(scripted, x, method="guided")


def test_guided_backprop_without_relus_names_the_problem():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="guided backpropagation needs ReLU activations"):
        saliency(model, torch.randn(2, 3, 8, 8), method="guided")


@pytest.mark.parametrize("batch_size", [None, 6, 4, 1], ids=["default", "whole-images", "split-copies", "one"])
def test_smoothgrad_averages_the_gradients_of_noisy_copies(tiny, monkeypatch, batch_size):
    x, labels = make_batch(4, n=5)
    samples, noise, seed = 3, 0.2, 7
    monkeypatch.setattr(saliency_module, "MAX_BATCH", 9)  # the default: three images per pass
    grads, _ = input_gradients(tiny, x, labels, "smoothgrad", samples=samples, noise=noise, seed=seed,
                               batch_size=batch_size)
    batch = batch_size or 9
    generator = torch.Generator().manual_seed(seed)
    spread = noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))
    pairs = [(i, copy) for i in range(5) for copy in range(samples)]  # (image, copy), image by image
    draws = torch.cat([torch.randn((len(pairs[s : s + batch]), *x.shape[1:]), generator=generator)
                       for s in range(0, len(pairs), batch)])  # drawn pass by pass
    expected = torch.zeros_like(x)
    for (i, _), d in zip(pairs, draws, strict=True):  # then one noisy copy at a time
        expected[i] += _gradient(tiny, (x[i] + d * spread[i])[None], labels[i : i + 1])[0] / samples
    assert torch.allclose(grads, expected, atol=1e-5)


def test_smoothgrad_passes_hold_at_most_batch_size_images(tiny):
    sizes = []
    handle = tiny.stem.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    x, labels = make_batch(4, n=5)
    input_gradients(tiny, x, labels, "smoothgrad", samples=7, batch_size=4)
    handle.remove()
    assert sizes == [4] * 8 + [3]  # 35 noisy images; given targets need no clean pass
    sizes.clear()
    handle = tiny.stem.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    input_gradients(tiny, x, None, "smoothgrad", samples=100)
    handle.remove()
    assert sizes == [5] + [64] * 7 + [52]  # the clean pass for the predicted classes, then 500 noisy images


def test_smoothgrad_without_noise_is_vanilla_and_with_noise_is_not(tiny):
    x, labels = make_batch(5)
    vanilla = saliency(tiny, x, labels)
    assert torch.allclose(saliency(tiny, x, labels, method="smoothgrad", samples=2, noise=0.0), vanilla, atol=1e-5)
    noisy = saliency(tiny, x, labels, method="smoothgrad", samples=4)
    assert not torch.allclose(noisy, vanilla, atol=1e-2)
    assert torch.equal(noisy, saliency(tiny, x, labels, method="smoothgrad", samples=4))  # own seeded generator
    assert not torch.equal(noisy, saliency(tiny, x, labels, method="smoothgrad", samples=4, seed=1))


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "guided"])
def test_every_method_leaves_the_model_and_the_global_rng_alone(method):
    torch.manual_seed(0)
    model = TinyCNN().train()
    before = copy.deepcopy(model.state_dict())
    x, _ = make_batch(6)
    rng = torch.get_rng_state()
    maps = saliency(model, x, method=method, samples=2)
    assert maps.shape == (8, 16, 16) and float(maps.amax()) == pytest.approx(1.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_methods_and_settings_are_named(tiny):
    x, _ = make_batch(7, n=2)
    with pytest.raises(ValueError, match="unknown saliency method 'guided-backprop': use one of vanilla"):
        saliency(tiny, x, method="guided-backprop")
    with pytest.raises(ValueError, match="samples must be a positive int"):
        saliency(tiny, x, method="smoothgrad", samples=0)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        saliency(tiny, x, method="smoothgrad", noise=-0.1)


def test_saliency_methods_side_by_side_equal_the_functional_maps(tmp_path):
    """The saliency strip: input, then one map per method, each the functional API's map of the true class."""
    methods = ("guided", "vanilla", "smoothgrad")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    probe, _ = make_batch(2, n=4)
    with torch.no_grad():
        labels = (model(probe).argmax(dim=1) + 1) % 4  # true classes that are not the predicted ones
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["saliency"], saliency_methods=methods,
                   seed=3, strict=True) as vis:
        vis.log_now(5)
    acc = read_events(tmp_path)
    pixels = image_at(acc, "cnnvis/saliency/input/probe_001", step=5)
    assert pixels.shape[1] == 2 + 4 * (96 + 2)  # input and three maps, 96 px each, 2 px apart
    for column, method in enumerate(methods, start=1):
        maps = saliency(model, probe, labels, method=method, seed=3)
        expected = to_uint8(fit(colorize(maps[1:2], "inferno"), 96, 96)[0]).permute(1, 2, 0).numpy()
        left = 2 + column * (96 + 2)
        shown = pixels[2 : 2 + 96, left : left + 96]
        assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1, method
    # the three maps differ from one another: they are not one map drawn three times
    panels = [pixels[2:98, 2 + c * 98 : 98 + c * 98].astype(int) for c in (1, 2, 3)]
    assert all(np.abs(a - b).mean() > 3 for i, a in enumerate(panels) for b in panels[i + 1 :])


def test_saliency_method_errors_are_raised_in_the_constructor(tmp_path):
    with pytest.raises(ValueError, match="unknown saliency method 'smooth' \\(did you mean 'smoothgrad'\\?\\)"):
        tiny_logger(tmp_path, kinds=["saliency"], saliency_methods=["vanilla", "smooth"])
    no_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="guided backpropagation needs ReLU activations"):
        tiny_logger(tmp_path, model=no_relu, kinds=["saliency"], saliency_methods="guided")
    with pytest.raises(ValueError, match="saliency_methods must name at least one"):
        tiny_logger(tmp_path, kinds=["saliency"], saliency_methods=[])


def test_a_failing_saliency_method_leaves_the_others_and_warns_once(tmp_path, monkeypatch):
    real = saliency_module.input_gradients

    def flaky(net, images, targets, method, **kwargs):
        if method == "guided":
            raise RuntimeError("out of memory (simulated)")
        return real(net, images, targets, method, **kwargs)

    monkeypatch.setattr(saliency_module, "input_gradients", flaky)
    with tiny_logger(tmp_path, kinds=["saliency", "histograms"], saliency_methods=("vanilla", "guided", "smoothgrad"),
                 strict=False) as vis:
        with pytest.warns(RuntimeWarning, match=r"the saliency \(guided\) visual failed at step 0.*simulated") as rec:
            vis.log_now(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same failure does not warn again
            vis.log_now(1)
    assert sum("saliency (guided)" in str(w.message) for w in rec) == 1
    acc = read_events(tmp_path)
    pixels = image_at(acc, "cnnvis/saliency/input/probe_000", step=1)
    assert pixels.shape[1] == 2 + 3 * (96 + 2)  # input, gradient, SmoothGrad
    assert "cnnvis/histograms/stem.0/weight" in acc.Tags()["histograms"]


# ---------------------------------------------------------------------- deconvnet and guided Grad-CAM
class _Plain(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> linear, with functional ReLUs so a reference can swap them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x, relu=torch.relu):
        x = relu(self.c2(relu(self.c1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _deconv_reference(model, x, targets):
    """Deconvnet written out: a ReLU whose backward keeps the gradient's positive part, wherever the input was."""

    class Deconv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            return g.clamp_min(0)

    x = x.clone().requires_grad_(True)
    scores = model(x, relu=Deconv.apply)
    (g,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), [x])
    return saliency_from_gradients(g)


def test_deconvnet_equals_a_hand_written_deconvnet():
    model = _Plain().eval()
    x, _ = make_batch(5, n=3)
    targets = torch.tensor([0, 2, 3])
    ours = saliency(model, x, targets, method="deconvnet")
    assert torch.allclose(ours, _deconv_reference(model, x, targets), atol=1e-6)
    assert not torch.allclose(ours, saliency(model, x, targets, method="guided"), atol=1e-3)  # a different rule


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_gradcam():
    model = _Plain().eval()
    x, _ = make_batch(6, n=2)
    targets = torch.tensor([1, 3])
    ours = saliency(model, x, targets, method="guided_gradcam", layer="c2")
    product = saliency(model, x, targets, method="guided") * grad_cam(model, x, "c2", targets)
    lo, hi = product.amin(dim=(1, 2), keepdim=True), product.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(ours, (product - lo) / (hi - lo), atol=1e-5)


def test_the_saliency_kind_shows_deconvnet_and_guided_gradcam(tmp_path):
    model = _Plain()
    x, labels = make_batch(7, n=2)
    with VisLogger(model, tmp_path, probe=x, probe_labels=labels, kinds=["saliency"], strict=True,
                   saliency_methods=("deconvnet", "guided_gradcam")) as vis:
        vis.step(0)
    strip = image_at(read_events(tmp_path), "cnnvis/saliency/input/probe_000")
    assert strip.shape[1] == 2 + 3 * (96 + 2)  # input, deconvnet, guided Grad-CAM
    assert model.training
