"""The shared probe pass: one forward for every due kind, one ``autograd.grad`` per distinct target set."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import TinyCNN, hook_counts, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import Needs
from cnnvis_tb.probe_pass import run_probe_pass

#: The kinds that take everything from the shared pass (actmax, SmoothGrad and guided backprop run their own).
SHARED_PASS_KINDS = ["gradcam", "features", "saliency", "kernels", "histograms"]


class Counts:
    """Forward passes of a model (a pre-hook on the model itself) and calls of ``torch.autograd.grad``."""

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch):
        self.forwards = 0
        self.grads = 0
        self._handle = model.register_forward_pre_hook(self._forward)
        real = torch.autograd.grad

        def counting_grad(*args, **kwargs):
            self.grads += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting_grad)

    def _forward(self, _module, _inputs):
        self.forwards += 1

    def reset(self) -> Counts:
        self.forwards = self.grads = 0
        return self

    def remove(self) -> None:
        self._handle.remove()


def _model_and_probe():
    torch.manual_seed(0)
    model = TinyCNN()
    probe, _ = make_batch(2, n=4)
    with torch.no_grad():
        pred = model.eval()(probe).argmax(dim=1)
    model.train()
    return model, probe, pred


@pytest.mark.parametrize("labels, grads", [
    ("wrong", 2), ("some wrong", 2), ("right", 1), ("none", 1),
], ids=["all-wrong", "some-wrong", "all-right", "no-labels"])
def test_one_forward_and_one_gradient_per_distinct_target_set(tmp_path, monkeypatch, labels, grads):
    model, probe, pred = _model_and_probe()
    given = {"wrong": (pred + 1) % 4, "some wrong": torch.cat([pred[:2], (pred[2:] + 1) % 4]), "right": pred,
             "none": None}[labels]
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=given, kinds=SHARED_PASS_KINDS, strict=True,
                    cam_metrics=False)  # the confidence metrics run passes of their own
    counts = Counts(model, monkeypatch)  # after the constructor's own dry run
    for step in range(3):
        counts.reset()
        vis.log_now(step)  # every kind at once
        assert (counts.forwards, counts.grads) == (1, grads), step
    counts.remove()
    vis.close()
    tags = read_events(tmp_path).Tags()["images"]
    assert {t.split("/")[1] for t in tags} == {"gradcam", "features", "saliency", "kernels"}


def test_kinds_that_need_no_forward_run_none(tmp_path, monkeypatch):
    model, probe, pred = _model_and_probe()
    with VisLogger(model, tmp_path, probe=probe, probe_labels=pred, kinds=["kernels", "histograms"], every=1,
                   strict=True) as vis:
        counts = Counts(model, monkeypatch)
        vis.step(0)
        assert (counts.forwards, counts.grads) == (0, 0)
        counts.remove()


def test_true_reuses_the_pred_gradients_when_every_prediction_is_right():
    model, probe, pred = _model_and_probe()
    model.eval()
    needs = Needs(graph_activations=("body",), input_gradients=True)
    right = run_probe_pass(model, probe, needs, labels=pred)
    assert right.grads["true"] is right.grads["pred"]
    wrong = run_probe_pass(model, probe, needs, labels=(pred + 1) % 4)
    assert wrong.grads["true"] is not wrong.grads["pred"]
    assert torch.equal(wrong.grads["pred"]["body"], right.grads["pred"]["body"])
    assert not torch.allclose(wrong.grads["true"]["body"], wrong.grads["pred"]["body"])


def _reference_gradients(model, images, layer_name, targets):
    """Gradients of the targets' summed scores w.r.t. a layer's output and the input, by hand on a copy."""
    model = copy.deepcopy(model).eval()
    saved = {}

    def hook(_m, _i, out):
        out = out.clone()  # before any in-place op that follows the layer
        saved["a"] = out
        return out

    dict(model.named_modules())[layer_name].register_forward_hook(hook)
    x = images.clone().requires_grad_(True)
    scores = model(x)
    return torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), [saved["a"], x])


@pytest.mark.parametrize("layer", ["stem", "body.3", "body"])
def test_gradients_equal_a_hand_computation_and_leave_the_parameters_alone(layer):
    model, probe, pred = _model_and_probe()
    labels = (pred + 1) % 4
    model.eval()
    hooks = hook_counts(model)
    shared = run_probe_pass(model, probe, Needs(graph_activations=(layer,), activations=("stem.0",),
                                                input_gradients=True), labels=labels)
    assert hook_counts(model) == hooks and all(p.grad is None for p in model.parameters())
    assert torch.equal(shared.targets["true"], labels) and torch.equal(shared.targets["pred"], pred)
    for key, targets in shared.targets.items():
        by_layer, by_input = _reference_gradients(model, probe, layer, targets)
        assert torch.allclose(shared.grads[key][layer], by_layer, atol=1e-6), key
        assert torch.allclose(shared.grads[key]["input"], by_input, atol=1e-6), key
    assert shared.graph_activations[layer].requires_grad
    assert not shared.activations["stem.0"].requires_grad  # a detached copy
    with torch.no_grad():
        assert torch.allclose(shared.activations["stem.0"], model.stem[0](probe))
    assert shared.probabilities.dtype == torch.float32 and torch.allclose(shared.probabilities.sum(1), torch.ones(4))


def test_scores_only_take_no_gradient(monkeypatch):
    model, probe, pred = _model_and_probe()
    model.eval()
    counts = Counts(model, monkeypatch)
    shared = run_probe_pass(model, probe, Needs(scores=True, activations=("body.3",)), labels=pred)
    assert (counts.forwards, counts.grads) == (1, 0)
    assert shared.grads == {} and not shared.scores.requires_grad and not shared.inputs.requires_grad
    assert shared.activations["body.3"].shape == (4, 16, 8, 8)
    counts.remove()


class SideBranch(TinyCNN):
    """A convolution that runs but whose output the class scores ignore."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        self.side(x)
        return super().forward(x)


def test_a_layer_the_scores_do_not_depend_on_has_no_gradient(tmp_path):
    torch.manual_seed(0)
    model = SideBranch().eval()
    probe, labels = make_batch(2, n=2)
    shared = run_probe_pass(model, probe, Needs(graph_activations=("side", "body")), labels=labels)
    assert shared.grads["true"]["side"] is None and shared.grads["true"]["body"] is not None
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], every=1, strict=True,
                   layers={"gradcam": ["side"]}) as vis:
        with pytest.raises(RuntimeError, match="the class scores do not depend on layer 'side'"):
            vis.step(0)


def test_a_removed_gradcam_layer_does_not_stop_the_other_kinds(tmp_path):
    """The shared pass serves every kind: a Grad-CAM layer gone from the model warns about that layer, and the
    feature maps (whose layer is still there) keep logging."""
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(2, n=2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=["gradcam", "features"],
                    layers={"gradcam": ["body.4"], "features": ["stem.0"]})
    del model.body._modules["4"]  # the BatchNorm after body.3 is gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis.step(0)
        vis.step(1)
    vis.close()
    messages = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    assert len(messages) == 1 and "layers ['body.4'] are no longer in the model" in messages[0], messages
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/features/stem.0/probe_000")] == [0, 1]


def test_needs_union_and_checks():
    union = Needs(activations=("a",)) | Needs(activations=("a", "b"), graph_activations=("c",)) | Needs(scores=True)
    assert union == Needs(activations=("a", "b"), graph_activations=("c",), scores=True)
    assert union.forward and union.gradients
    assert not Needs().forward and Needs(scores=True).forward and not Needs(scores=True).gradients
    assert Needs(input_gradients=True).gradients
    with pytest.raises(TypeError, match=r"Needs.activations must be a sequence of layer names, got 'body'"):
        Needs(activations="body")
