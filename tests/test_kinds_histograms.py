"""Parameter and gradient histograms: golden values, non-finite values skipped and counted, read back."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from _models import TinyCNN, make_batch, read_events, tiny_logger
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds.histograms import histogram


def test_histogram_golden_values():
    summary = histogram(torch.tensor([0.0, 1.0, 2.0, 3.0]), bins=3)
    assert summary == {
        "min": 0.0, "max": 3.0, "num": 4, "sum": 6.0, "sum_squares": 14.0,
        "bucket_limits": [1.0, 2.0, 3.0], "bucket_counts": [1.0, 1.0, 2.0], "nonfinite": 0,
    }


def test_histogram_skips_and_counts_non_finite_values():
    summary = histogram(torch.tensor([float("nan"), float("inf"), 1.0, -float("inf"), 2.0]), bins=2)
    assert summary["nonfinite"] == 3 and summary["num"] == 2 and summary["sum"] == 3.0
    assert (summary["min"], summary["max"]) == (1.0, 2.0) and sum(summary["bucket_counts"]) == 2
    assert histogram(torch.full((3,), float("nan"))) is None  # nothing finite: nothing to show


def test_histogram_of_a_constant_tensor_has_one_full_bucket():
    summary = histogram(torch.full((5,), -2.0), bins=4)
    assert summary["min"] == -2.0 and summary["max"] > -2.0  # a non-empty range
    assert summary["bucket_counts"] == [5.0, 0.0, 0.0, 0.0]


def test_every_parameter_is_logged_and_reads_back(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    with tiny_logger(tmp_path, model=model, kinds=["histograms"], every=1) as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    expected = set()
    for name, _ in model.named_parameters():
        module, _, tensor = name.rpartition(".")
        expected.add(f"cnnvis/histograms/{module}/{tensor}")
    assert set(acc.Tags()["histograms"]) == expected  # no .grad histogram: no backward ran
    hist = acc.Histograms("cnnvis/histograms/body.3/weight")[0].histogram_value
    weight = model.body[3].weight.detach()
    assert hist.num == weight.numel() and sum(hist.bucket) == hist.num
    assert np.isclose(hist.min, weight.min().item()) and np.isclose(hist.max, weight.max().item())
    assert np.isclose(hist.sum_squares, weight.square().sum().item(), rtol=1e-5)


def test_gradient_histograms_when_grads_exist(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_batch(1)
    nn.functional.cross_entropy(model(x), y).backward()
    with VisLogger(model, tmp_path, probe=x, kinds=["histograms"], every=1) as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    hist = acc.Histograms("cnnvis/histograms/stem.0/weight.grad")[0].histogram_value
    assert hist.num == model.stem[0].weight.numel()
    assert np.isclose(hist.sum, model.stem[0].weight.grad.sum().item(), rtol=1e-4, atol=1e-6)
    assert sum(hist.bucket) == hist.num


def test_nan_weights_are_left_out_with_one_warning(tmp_path):
    model = TinyCNN()
    vis = tiny_logger(tmp_path, model=model, every=1, kinds=["histograms"], strict=False)
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("nan")
        model.head.bias.fill_(float("inf"))  # nothing finite left: no histogram at all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis.step(0)
        vis.step(1)
    vis.close()
    messages = [str(w.message) for w in caught]
    assert sum("1 non-finite values left out of the histogram cnnvis/histograms/stem.0/weight" in m
               for m in messages) == 1, messages
    assert sum("4 non-finite values left out of the histogram cnnvis/histograms/head/bias" in m
               for m in messages) == 1, messages
    acc = read_events(tmp_path)
    assert [e.histogram_value.num for e in acc.Histograms("cnnvis/histograms/stem.0/weight")] == [8 * 27 - 1] * 2
    assert "cnnvis/histograms/head/bias" not in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")] == [0, 1]  # the others still log
