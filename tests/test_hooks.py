"""Forward hooks in one place: what ``capture`` records, what it passes on, and that no hook outlives it."""

from __future__ import annotations

import collections

import pytest
import torch
from _models import TinyCNN, hook_counts, make_batch
from torch import nn

from cnnvis_tb.hooks import StopForward, capture, first_tensor


def test_first_tensor_of_each_output_form():
    flat, image = torch.zeros(2, 3), torch.zeros(2, 3, 4, 4)
    assert first_tensor(image) is image
    assert first_tensor((flat, image)) is image  # the first 4-D tensor wins
    assert first_tensor([image, flat]) is image
    assert first_tensor({"logits": flat, "map": image}) is image
    assert first_tensor((1, flat, torch.zeros(5))) is flat  # no 4-D tensor: the first tensor
    assert first_tensor(("text", 3)) is None and first_tensor(None) is None and first_tensor({}) is None


def test_capture_records_detached_copies_and_removes_its_hooks():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    hooks = hook_counts(model)
    images, _ = make_batch(1, n=2)
    with capture({"stem.1": model.stem[1], "body.3": model.body[3]}) as acts:
        assert hook_counts(model) != hooks
        model(images)
    assert hook_counts(model) == hooks
    assert set(acts) == {"stem.1", "body.3"} and not acts["stem.1"].requires_grad
    with torch.no_grad():
        before_relu = model.stem[1](model.stem[0](images))
    assert (acts["stem.1"] < 0).any() and torch.allclose(acts["stem.1"], before_relu)  # before the in-place ReLU


def test_capture_removes_its_hooks_when_the_forward_raises():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    hooks = hook_counts(model)
    with pytest.raises(RuntimeError, match="channels"):
        with capture({"stem.0": model.stem[0], "head": model.head}):
            model(torch.zeros(1, 5, 8, 8))  # the wrong number of channels
    assert hook_counts(model) == hooks


def test_capture_for_grad_records_the_activation_as_the_network_consumes_it():
    """In the graph, the recorded tensor is the copy passed on: the in-place ReLU after the layer shows in it, the
    layer's own output tensor is left as the layer made it, and gradients are those of the activation as used."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images, labels = make_batch(1, n=3)
    produced = {}
    model.stem[1].register_forward_hook(lambda _m, _i, out: produced.update(out=out))  # runs before capture's
    with capture({"stem.1": model.stem[1]}, for_grad=True) as acts:
        scores = model(images)
    a = acts["stem.1"]
    assert a.requires_grad and (a >= 0).all()  # after the in-place ReLU
    assert (produced["out"] < 0).any()  # the layer's own output was not overwritten
    (grad,) = torch.autograd.grad(scores.gather(1, labels[:, None]).sum(), [a])
    # by hand: the scores as a function of the ReLU's output
    with torch.no_grad():
        relu_out = torch.relu(model.stem[1](model.stem[0](images)))
    x = relu_out.clone().requires_grad_(True)
    by_hand = model.head(model.body(x).mean(dim=(2, 3)))
    (expected,) = torch.autograd.grad(by_hand.gather(1, labels[:, None]).sum(), [x])
    assert torch.allclose(a.detach(), relu_out, atol=1e-6) and torch.allclose(grad, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(scores, model(images), atol=1e-6)  # the model computed what it computes anyway


def test_the_last_call_of_a_module_called_twice_wins():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice()
    x = torch.randn(1, 3, 4, 4)
    with capture({"conv": model.conv}) as acts:
        out = model(x)
    assert torch.equal(acts["conv"], out.detach())


def test_stop_after_cuts_the_forward_short():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    ran = []
    model.head.register_forward_pre_hook(lambda m, i: ran.append("head"))
    hooks = hook_counts(model)
    images, _ = make_batch(1, n=2)
    with capture({"stem.0": model.stem[0], "body.0": model.body[0]}, stop_after="body.0") as acts:
        model(images)
        pytest.fail("the forward pass should have been cut short")
    assert set(acts) == {"stem.0", "body.0"} and ran == []
    assert hook_counts(model) == hooks


def test_stop_before_records_the_input_in_the_graph():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images, _ = make_batch(1, n=2)
    x = images.clone().requires_grad_(True)
    with capture({}, stop_before={"head": model.head}) as acts:
        model(x)
    pooled = acts["head:input"]
    assert pooled.shape == (2, 16) and pooled.requires_grad
    with torch.no_grad():
        assert torch.allclose(pooled, model.body(model.stem(images)).mean(dim=(2, 3)))
    assert isinstance(StopForward("head"), Exception)


Features = collections.namedtuple("Features", "map pooled")


class NamedOutput(nn.Module):
    """A block whose output is a namedtuple that the next block reads by field name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return Features(y, y.mean(dim=(2, 3)))


class ReadsFields(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = NamedOutput()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out = self.block(x)
        return self.fc(out.map.amax(dim=(2, 3)) + out.pooled)


@pytest.mark.parametrize("for_grad", [False, True], ids=["copy", "in-graph"])
def test_a_namedtuple_output_keeps_its_type(for_grad):
    """The hook passes the layer's output on as the model built it: a namedtuple stays one."""
    torch.manual_seed(0)
    model = ReadsFields().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    with capture({"block": model.block}, for_grad=for_grad) as acts:
        scores = model(x)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert acts["block"].shape == (2, 4, 6, 6)
