"""Saliency methods: vanilla gradient, SmoothGrad and guided backpropagation, against references computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import TinyCNN, make_batch
from torch import nn

from cnnvis_tb import saliency
from cnnvis_tb.kinds import saliency as saliency_module
from cnnvis_tb.kinds.saliency import input_gradients, saliency_from_gradients


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


def test_guided_backprop_without_relus_names_the_problem():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="guided backpropagation needs ReLU activations"):
        saliency(model, torch.randn(2, 3, 8, 8), method="guided")


def test_smoothgrad_averages_the_gradients_of_noisy_copies(tiny, monkeypatch):
    x, labels = make_batch(4, n=5)
    samples, noise, seed = 3, 0.2, 7
    monkeypatch.setattr(saliency_module, "MAX_BATCH", 6)  # two images per batch: chunks of 2, 2, 1
    grads, _ = input_gradients(tiny, x, labels, "smoothgrad", samples=samples, noise=noise, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    spread = noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))
    expected = []
    for start in range(0, 5, 2):  # the same draws, then one noisy copy at a time
        part = slice(start, min(5, start + 2))
        draws = torch.randn((x[part].shape[0], samples, *x.shape[1:]), generator=generator)
        for i, image in zip(range(*part.indices(5)), x[part], strict=True):
            copies = [_gradient(tiny, (image + d * spread[i])[None], labels[i : i + 1]) for d in draws[i - start]]
            expected.append(torch.cat(copies).mean(dim=0))
    assert torch.allclose(grads, torch.stack(expected), atol=1e-5)


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
