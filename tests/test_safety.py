"""The training-safety contract of DESIGN.md, line by line."""

from __future__ import annotations

import collections
import copy
import warnings

import numpy as np
import pytest
import torch
from _models import TinyCNN, hook_counts, image_at, make_batch, read_events
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cnnvis_tb import VisLogger, grad_cam
from cnnvis_tb.kinds import ALL_KINDS, DeepDream
from cnnvis_tb.kinds.cam_methods import METHODS as CAM_METHODS
from cnnvis_tb.kinds.saliency import SALIENCY_METHODS

STEPS = 50


def _train(log_dir=None, *, call_between=False, async_logging=False):
    """Train TinyCNN for STEPS steps with dropout and BN; optionally log every kind at every step."""
    torch.manual_seed(1234)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe, labels = make_batch(99)
    vis = None
    if log_dir is not None:
        # DeepDream with 2 octaves of 2 steps: the same code as the default 3 x 10, at a tenth of the cost
        kinds = [k for k in ALL_KINDS if k != "deepdream"] + [DeepDream(octaves=2, steps=2)]
        vis = VisLogger(model, log_dir, probe=probe, probe_labels=labels, every=1, kinds=kinds,
                        strict=True, actmax_steps=2, actmax_channels=2, actmax_diversity=2,
                        saliency_methods=SALIENCY_METHODS, cam_methods=tuple(CAM_METHODS), cam_metrics="all",
                        probe_boxes=[[2, 2, 10, 12]] * len(labels),  # every metric on, the costly ones too
                        graph=True,  # and the model's graph, traced at the first step
                        async_logging=async_logging)
    for step in range(STEPS):
        x, y = make_batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if vis is not None and call_between:
            vis.step(step)
        opt.step()
        if vis is not None and not call_between:
            vis.step(step)
    if vis is not None:
        vis.close()
    return model, opt, torch.get_rng_state()


def _assert_same_state(a, b):
    (model_a, opt_a, rng_a), (model_b, opt_b, rng_b) = a, b
    for (name, ta), (_, tb) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(ta, tb), f"{name} differs"  # parameters, running stats, num_batches_tracked
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][field]), torch.as_tensor(sb[k][field])), f"optimizer {k}.{field}"
    assert torch.equal(rng_a, rng_b), "global RNG state differs"


@pytest.mark.parametrize(("call_between", "async_logging"), [(False, True), (True, False)],
                         ids=["after-step-async", "between-backward-and-step-sync"])
def test_training_is_bit_identical_with_every_kind_at_every_step(tmp_path, call_between, async_logging):
    reference = _train()
    logged = _train(tmp_path / "run", call_between=call_between, async_logging=async_logging)
    _assert_same_state(reference, logged)
    acc = read_events(tmp_path / "run")
    assert len(acc.Images(acc.Tags()["images"][0])) == STEPS  # it really logged at every step
    metrics = {t.split("/")[4] for t in acc.Tags()["scalars"] if t.startswith("cnnvis/metrics/gradcam/")}
    assert {"deletion", "insertion", "confidence_drop", "iou", "pointing", "stability"} <= metrics
    assert len(acc.Scalars("cnnvis/metrics/gradcam/body/deletion/scorecam/true")) == STEPS
    assert len(acc.Images("cnnvis/deepdream/body.0/probe_000")) == STEPS - 1  # every step but 0, as actmax
    assert any(node.op == "aten::_convolution" for node in acc.Graph().node)


def test_training_changes_without_the_guard_would_be_detected(tmp_path):
    """The comparison above can fail: one extra train-mode forward (as a careless visual would do) is caught."""
    reference = _train()
    torch.manual_seed(1234)
    model, opt, _ = _train()
    model.train()
    model(make_batch(0)[0])  # updates BN running stats and draws dropout masks from the global RNG
    with pytest.raises(AssertionError):
        _assert_same_state(reference, (model, opt, torch.get_rng_state()))


def _model_with_grads():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_batch(1)
    nn.functional.cross_entropy(model(x), y).backward()
    return model


def test_grads_untouched_between_backward_and_optimizer_step(tmp_path):
    model = _model_with_grads()
    before = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    probe, labels = make_batch(2)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                   actmax_steps=2) as vis:
        vis.step(0)
    for name, p in model.named_parameters():
        tensor, values = before[name]
        assert p.grad is tensor, f"{name}.grad was replaced"
        assert torch.equal(p.grad, values), f"{name}.grad was changed"


def test_parameters_without_grad_stay_without_grad(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(2)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                   actmax_steps=2) as vis:
        vis.step(0)
    assert all(p.grad is None for p in model.parameters())


def test_no_hook_left_and_user_hooks_kept(tmp_path):
    model = _model_with_grads()
    user_calls = []
    model.body[0].register_forward_hook(lambda *a: user_calls.append(1))
    before = hook_counts(model)
    assert sum(before.values()) == 1
    probe, labels = make_batch(2)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                   actmax_steps=2) as vis:
        assert hook_counts(model) == before
        vis.step(0)
        assert hook_counts(model) == before
    model(probe)
    assert user_calls, "the user's own hook no longer runs"


def _mixed_model():
    """Some parts frozen, some in eval mode: the flags a user sets on purpose must come back as they were."""
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    model.stem.requires_grad_(False)
    model.stem[1].eval()
    model.drop.eval()
    return model


def _flags(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.mark.parametrize(("part", "async_logging"), [("log", False), ("compute", True)],
                         ids=["log-sync", "compute-async"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_flags_restored_when_a_visual_raises(tmp_path, monkeypatch, kind, part, async_logging):
    """On the training thread the model is in use: a kind's compute (and, synchronously, its log) raising there
    leaves flags, hooks and RNG as they were, and strict raises at that step. (An asynchronous log runs on the
    worker, off the model; its failure raises at the next call: tests/test_async_logging.py.)"""
    model = _mixed_model()
    before_flags, before_hooks = _flags(model), hook_counts(model)
    rng = torch.get_rng_state()
    probe, labels = make_batch(2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, strict=True,
                    actmax_steps=2, async_logging=async_logging)

    def boom(*args, **kwargs):
        raise RuntimeError("visual exploded")

    monkeypatch.setattr(vis.kind(kind), part, boom)
    with pytest.raises(RuntimeError, match="visual exploded"):
        vis.step(1)  # every kind due
    assert _flags(model) == before_flags
    assert hook_counts(model) == before_hooks
    assert torch.equal(torch.get_rng_state(), rng)
    vis.close()


def test_failure_inside_the_forward_pass_restores_everything(tmp_path):
    """A layer that raises mid-forward (hooks attached, model in eval) leaves nothing behind."""
    model = _mixed_model()
    probe, labels = make_batch(2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, strict=True, actmax_steps=2)
    before_flags, before_hooks = _flags(model), hook_counts(model)
    original = model.body[3].forward

    def failing(x):
        if not model.training:  # only the logger's eval-mode passes fail
            raise ValueError("broken layer")
        return original(x)

    model.body[3].forward = failing
    with pytest.raises(ValueError, match="broken layer"):
        vis.step(0)
    assert _flags(model) == before_flags
    assert hook_counts(model) == before_hooks
    vis.close()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_failing_visual_warns_once_and_the_others_still_log(tmp_path, monkeypatch, kind):
    model = _mixed_model()
    probe, labels = make_batch(2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=ALL_KINDS, actmax_steps=2)
    monkeypatch.setattr(vis.kind(kind), "log", lambda *a: 1 / 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 3):  # every kind due at each
            vis.step(step)
    vis.close()
    ours = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    assert len(ours) == 1 and f"the {kind} visual failed" in ours[0] and "ZeroDivisionError" in ours[0], ours
    acc = read_events(tmp_path)
    logged = {t.split("/")[1] for t in acc.Tags()["images"]} | ({"histograms"} if acc.Tags()["histograms"] else set())
    logged |= {t.split("/")[2] for t in acc.Tags()["scalars"] if t.startswith("cnnvis/metrics/")}  # scalar kinds
    assert logged == set(ALL_KINDS) - {kind}
    assert all(len(acc.Images(t)) == 2 for t in acc.Tags()["images"])


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_gradcam_works_inside_no_grad_and_inference_mode(tmp_path, context):
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=["gradcam", "saliency"],
                    strict=True)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    with ctx():
        vis.step(0)
        maps = grad_cam(model, probe, "body", targets=labels)
        assert torch.is_grad_enabled() is False
    vis.close()
    assert maps.shape == (8, 16, 16) and torch.isfinite(maps).all() and maps.amax() == 1.0
    acc = read_events(tmp_path)
    assert len(acc.Tags()["images"]) == 16  # 8 Grad-CAM strips + 8 saliency strips


class _FloatDtypes(TorchDispatchMode):
    """The dtypes of the floating-point tensors every op returns, counted."""

    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes[t.dtype] += 1
        return out


def test_autocast_active_logging_computes_in_float32(tmp_path):
    """Under AMP autocast the logger's passes run in the model's float32: every layer output and every op result of
    a logging step is float32 (also the extra SmoothGrad, guided and actmax passes), and the Grad-CAM pictures are
    those of a step logged without autocast."""
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(2, n=4)
    common = {"probe": probe, "probe_labels": labels, "every": 1, "kinds": ALL_KINDS, "strict": True,
              "actmax_steps": 2, "saliency_methods": ("vanilla", "smoothgrad", "guided")}
    with VisLogger(model, tmp_path / "plain", **common) as vis:
        vis.log_now(1)
    plain = grad_cam(model, probe, "body", targets=labels)

    layer_dtypes = []
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    handles = [m.register_forward_hook(lambda _m, _i, out: layer_dtypes.append(out.dtype)) for m in layers]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(probe)  # the records can tell: outside the logger, autocast runs the layers in bfloat16
            model.train()
            assert torch.bfloat16 in layer_dtypes
            layer_dtypes.clear()
            vis = VisLogger(model, tmp_path / "amp", **common)
            with _FloatDtypes() as ops:
                vis.log_now(1)
            vis.close()
            under_amp = grad_cam(model, probe, "body", targets=labels)
    finally:
        for handle in handles:
            handle.remove()
    assert len(layer_dtypes) > len(layers) and set(layer_dtypes) == {torch.float32}
    assert ops.dtypes and set(ops.dtypes) == {torch.float32}, ops.dtypes
    assert under_amp.dtype == torch.float32 and torch.equal(plain, under_amp)
    amp, reference = read_events(tmp_path / "amp"), read_events(tmp_path / "plain")
    for i in range(4):
        tag = f"cnnvis/gradcam/body/probe_{i:03d}"
        assert np.array_equal(image_at(amp, tag), image_at(reference, tag)), tag


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_step_with_nothing_due_runs_no_op_and_registers_no_hook(tmp_path, monkeypatch):
    model = _model_with_grads()
    probe, labels = make_batch(2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=10, strict=True)
    registered = []
    original = nn.Module.register_forward_hook
    monkeypatch.setattr(nn.Module, "register_forward_hook",
                        lambda self, *a, **k: registered.append(self) or original(self, *a, **k))
    with _CountOps() as counter:
        for step in range(1, 10):
            assert vis.step(step) is False
    assert counter.ops == [] and registered == []
    with _CountOps() as counter:  # the counter does see a logging step's work
        assert vis.step(10) is True
    assert counter.ops and registered
    vis.close()


def test_dataparallel_wrapper_is_looked_through(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    wrapped = nn.DataParallel(model)
    probe, labels = make_batch(2)
    snapshot = copy.deepcopy(model.state_dict())
    with VisLogger(wrapped, tmp_path, probe=probe, probe_labels=labels, every=1, strict=True, actmax_steps=2) as vis:
        vis.step(0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert "cnnvis/gradcam/body/probe_000" in read_events(tmp_path).Tags()["images"]
