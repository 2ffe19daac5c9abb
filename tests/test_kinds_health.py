"""The health kind: training-health scalars read back from the event files, against hand computations."""

from __future__ import annotations

import pytest
import torch
from _models import TinyCNN, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


class TwoLayer(nn.Module):
    """conv -> ReLU -> pool -> linear, with the conv's bias setting the sign of every ReLU input."""

    def __init__(self, bias: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.mul_(1e-3)
            self.conv.bias.fill_(bias)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(("bias", "dead"), [(-50.0, 1.0), (50.0, 0.0)])
def test_dead_fraction_is_one_for_forced_negative_inputs_and_zero_for_positive(tmp_path, bias, dead):
    probe = torch.rand(4, 3, 8, 8)
    with VisLogger(TwoLayer(bias), tmp_path, probe=probe, kinds=["health"], strict=True) as vis:
        assert vis.layers["health"] == ["relu"]  # the activation module, by default
        vis.step(0)
    assert _scalars(read_events(tmp_path), "cnnvis/metrics/health/relu/dead_fraction") == {0: dead}


def test_update_ratio_grad_norm_and_statistics_equal_hand_computations(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(1, n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["health"], every=1, strict=True) as vis:
        assert vis.layers["health"] == ["stem.2", "body.2", "body.5"]  # TinyCNN's ReLUs
        vis.step(0)  # no .grad yet: no grad_norm
        before = model.body[0].weight.detach().clone()
        x, y = make_batch(2)
        nn.functional.cross_entropy(model(x), y).backward()
        grad = model.body[0].weight.grad.detach().clone()
        opt.step()
        vis.step(1)
        after = model.body[0].weight.detach().clone()
        model.eval()
        with torch.no_grad():
            acts = {}
            handle = model.body[2].register_forward_hook(lambda m, i, o: acts.update(a=o.clone()))
            scores = model(probe)
            handle.remove()
        model.train()
    acc = read_events(tmp_path)
    ratio = _scalars(acc, "cnnvis/metrics/health/body.0/update_ratio")
    assert list(ratio) == [1]
    assert ratio[1] == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-5)
    assert _scalars(acc, "cnnvis/metrics/health/body.0/weight_norm")[1] == pytest.approx(after.norm().item(), rel=1e-5)
    assert list(_scalars(acc, "cnnvis/metrics/health/body.0/grad_norm")) == [1]
    assert _scalars(acc, "cnnvis/metrics/health/body.0/grad_norm")[1] == pytest.approx(grad.norm().item(), rel=1e-5)
    assert _scalars(acc, "cnnvis/metrics/health/body.2/act_mean")[1] == pytest.approx(acts["a"].mean().item(),
                                                                                         rel=1e-4)
    assert _scalars(acc, "cnnvis/metrics/health/body.2/act_std")[1] == pytest.approx(acts["a"].std().item(), rel=1e-4)
    dead = (acts["a"].transpose(0, 1).flatten(1).amax(dim=1) <= 0).float().mean().item()
    assert _scalars(acc, "cnnvis/metrics/health/body.2/dead_fraction")[1] == pytest.approx(dead)
    probs = scores.softmax(dim=1)
    assert _scalars(acc, "cnnvis/metrics/health/probe/accuracy")[1] == pytest.approx(
        (scores.argmax(1) == labels).float().mean().item())
    assert _scalars(acc, "cnnvis/metrics/health/probe/true_probability")[1] == pytest.approx(
        probs.gather(1, labels[:, None]).mean().item(), rel=1e-5)
    for i in range(len(labels)):
        assert _scalars(acc, f"cnnvis/metrics/health/probe/true_probability/probe_{i:03d}")[1] == pytest.approx(
            probs[i, labels[i]].item(), rel=1e-5)


def test_the_health_kind_is_on_by_default_and_leaves_grad_alone(tmp_path):
    model = TinyCNN()
    probe, labels = make_batch(3, n=2)
    x, y = make_batch(4)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, strict=True) as vis:
        assert "health" in vis.kinds
        vis.step(0)
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert any(t.startswith("cnnvis/metrics/health/") for t in read_events(tmp_path).Tags()["scalars"])
