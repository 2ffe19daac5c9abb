"""``VisLogger(graph=True)``: the model's graph for TensorBoard's Graphs tab, logged once under the safety contract;
a model that cannot be traced warns once and everything else still logs."""

from __future__ import annotations

import collections
import glob
import warnings

import pytest
import torch
from _models import TinyCNN, hook_counts, make_batch, read_events, tiny_logger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from cnnvis_tb import VisLogger


class Branchy(TinyCNN):
    """Data-dependent control flow: which head runs depends on the input's values (no trace can record that)."""

    def forward(self, x):
        features = self.body(self.stem(x))
        if features.sum() > 0:
            return self.head(features.mean(dim=(2, 3)))
        return -self.head(features.mean(dim=(2, 3)))


def _graph_events(log_dir) -> int:
    return sum(
        event.HasField("graph_def")
        for path in glob.glob(f"{log_dir}/events.out.tfevents.*")
        for event in EventFileLoader(path).Load()
    )


def test_the_graph_reads_back_with_the_models_convolutions_logged_once(tmp_path):
    with tiny_logger(tmp_path, kinds=["kernels"], every=1, graph=True) as vis:
        for step in range(3):
            vis.step(step)
    acc = read_events(tmp_path)
    ops = collections.Counter(node.op for node in acc.Graph().node)
    assert ops["aten::_convolution"] == 3 and ops["aten::batch_norm"] == 3 and ops["aten::linear"] == 1, ops
    convs = sorted(node.name for node in acc.Graph().node if node.op == "aten::_convolution")
    assert [name.split("/")[1:3] for name in convs] == [
        ["Sequential[body]", "Conv2d[0]"],
        ["Sequential[body]", "Conv2d[3]"],
        ["Sequential[stem]", "Conv2d[0]"],
    ]
    assert _graph_events(tmp_path) == 1  # once per run, at the first logging step
    assert len(acc.Images("cnnvis/kernels/stem.0/grid")) == 3


def test_no_graph_unless_asked(tmp_path):
    with tiny_logger(tmp_path, kinds=["kernels"], every=1) as vis:
        vis.step(0)
    assert _graph_events(tmp_path) == 0


def test_graph_is_logged_at_the_first_logging_step_whichever_it_is(tmp_path):
    with tiny_logger(tmp_path, kinds=["kernels"], every=5, graph=True) as vis:
        assert _graph_events(tmp_path) == 0  # nothing written by the constructor
        for step in range(1, 6):
            vis.step(step)
    assert _graph_events(tmp_path) == 1


def test_an_untraceable_model_warns_once_and_the_rest_logs(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tiny_logger(tmp_path, Branchy(), kinds=["gradcam", "kernels"], every=1, graph=True, strict=False) as vis:
            for step in range(3):
                vis.step(step)
    ours = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    assert len(ours) == 1, ours
    assert "the graph visual failed at step 0" in ours[0] and "depends on its input" in ours[0]
    assert "graph=False" in ours[0]
    assert not [w for w in caught if issubclass(w.category, (torch.jit.TracerWarning, FutureWarning))]
    acc = read_events(tmp_path)
    assert _graph_events(tmp_path) == 0
    assert len(acc.Images("cnnvis/gradcam/body/probe_000")) == 3 and len(acc.Images("cnnvis/kernels/stem.0/grid")) == 3


def test_an_untraceable_model_raises_under_strict(tmp_path):
    torch.manual_seed(0)
    vis = tiny_logger(tmp_path, Branchy(), kinds=["kernels"], every=1, graph=True)
    with pytest.raises(RuntimeError, match=r"the model's graph depends on its input.*Converting a tensor to a Python"):
        vis.step(0)
    vis.close()


def test_tracing_leaves_modes_hooks_rng_and_grads_alone(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().train()
    model.stem[1].eval()  # flags the user set on purpose come back as they were
    model.stem.requires_grad_(False)
    x, y = make_batch(1)
    nn.functional.cross_entropy(model(x), y).backward()  # step() between backward() and optimizer.step()
    model.body[0].register_forward_hook(lambda *a: None)
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )
    hooks, state = hook_counts(model), {k: v.clone() for k, v in model.state_dict().items()}
    with tiny_logger(tmp_path, model, kinds=["kernels"], every=1, graph=True) as vis:
        rng = torch.get_rng_state()  # tiny_logger seeds the global RNG: the state to keep is the one after it
        with torch.no_grad():
            vis.step(0)
    assert _graph_events(tmp_path) == 1
    assert flags == (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )
    assert hook_counts(model) == hooks and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for name, p in model.named_parameters():
        tensor, values = grads[name]
        assert p.grad is tensor and (values is None or torch.equal(p.grad, values)), name


def _train(log_dir=None, steps: int = 6):
    """TinyCNN trained with dropout and BN, optionally with a graph-logging VisLogger stepping every step."""
    torch.manual_seed(7)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe, labels = make_batch(99, n=2)
    vis = None
    if log_dir is not None:
        vis = VisLogger(
            model, log_dir, probe=probe, probe_labels=labels, kinds=["kernels"], every=1, graph=True, strict=True
        )
    for step in range(steps):
        x, y = make_batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if vis is not None:
            vis.step(step)
        opt.step()
    if vis is not None:
        vis.close()
    return model.state_dict(), opt.state_dict()["state"], torch.get_rng_state()


def test_training_is_bit_identical_with_the_graph_logged(tmp_path):
    (model_a, opt_a, rng_a), (model_b, opt_b, rng_b) = _train(), _train(tmp_path)
    assert _graph_events(tmp_path) == 1
    for name, value in model_a.items():
        assert torch.equal(value, model_b[name]), name
    for k, fields in opt_a.items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[k][field])), (k, field)
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_graph_must_be_a_bool(tmp_path, value):
    with pytest.raises(TypeError, match=r"graph must be True or False \(log the model's graph once"):
        tiny_logger(tmp_path, graph=value)
