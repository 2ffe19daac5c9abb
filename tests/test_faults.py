"""Faults during training: the run goes on, one warning per problem, the other kinds keep logging; nothing lost."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from _models import TinyCNN, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import DEFAULT_KINDS

KINDS = DEFAULT_KINDS


def _vis(tmp_path, model=None, **kwargs):
    torch.manual_seed(0)
    probe, labels = make_batch(3, n=2)
    kwargs.setdefault("actmax_steps", 2)
    kwargs.setdefault("kinds", KINDS)
    return VisLogger(model or TinyCNN(), tmp_path, probe=probe, probe_labels=labels, every=1, **kwargs)


def _run(vis, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in steps:
            vis.step(step)
    return [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]


def _steps(acc, tag):
    return [e.step for e in acc.Images(tag)]


def test_nan_weights_and_activations_keep_training_and_logging(tmp_path):
    model = TinyCNN()
    vis = _vis(tmp_path, model)
    with torch.no_grad():
        model.body[3].weight.fill_(float("nan"))  # every activation after it is NaN too
    messages = _run(vis, range(4))
    vis.close()
    assert len(messages) == len(set(messages)) and 1 <= len(messages) <= 6, messages  # once per problem, not per step
    assert any("NaN or inf" in m for m in messages)
    acc = read_events(tmp_path)
    for tag in ("cnnvis/kernels/stem.0/grid", "cnnvis/gradcam/body/probe_000", "cnnvis/features/body.3/probe_001"):
        assert _steps(acc, tag) == [0, 1, 2, 3], tag
    assert _steps(acc, "cnnvis/actmax/body.3/channels") == [1, 2, 3]  # the schedule starts actmax at its interval


def test_layer_removed_between_steps(tmp_path):
    model = TinyCNN()
    vis = _vis(tmp_path, model)
    _run(vis, [0])
    model.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())  # body.3 is gone
    messages = _run(vis, [1, 2, 3])
    vis.close()
    assert messages and all("no longer in the model" in m for m in messages)
    assert len(messages) == len(set(messages))
    acc = read_events(tmp_path)
    assert _steps(acc, "cnnvis/kernels/stem.0/grid") == [0, 1, 2, 3]  # unaffected kinds go on
    assert _steps(acc, "cnnvis/gradcam/body/probe_000") == [0, 1, 2, 3]  # 'body' still exists (replaced)
    assert _steps(acc, "cnnvis/features/body.3/probe_000") == [0]


def test_layer_removed_strict_raises(tmp_path):
    model = TinyCNN()
    vis = _vis(tmp_path, model, strict=True, async_logging=False)  # raised at this step (async: at the next call)
    model.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    with pytest.raises(LookupError, match=r"layers \['body.3'\] are no longer in the model"):
        vis.step(0)
    vis.close()


def test_probe_follows_the_model_to_another_dtype_and_device(tmp_path):
    model = TinyCNN()
    vis = _vis(tmp_path, model, strict=True)
    model.double()  # the model moved after the logger was made: the probe follows it
    vis.step(0)
    vis.close()
    assert _steps(read_events(tmp_path), "cnnvis/gradcam/body/probe_000") == [0]


def test_out_of_memory_inside_a_visual(tmp_path, monkeypatch):
    from cnnvis_tb.kinds import actmax as actmax_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    vis = _vis(tmp_path)
    monkeypatch.setattr(actmax_module, "optimize_channels", oom)
    messages = _run(vis, range(3))
    vis.close()
    assert len(messages) == 1 and "actmax" in messages[0] and "OutOfMemoryError" in messages[0]
    acc = read_events(tmp_path)
    assert _steps(acc, "cnnvis/gradcam/body/probe_000") == [0, 1, 2]
    assert not any("actmax" in t for t in acc.Tags()["images"])

    strict = _vis(tmp_path / "strict", strict=True)
    with pytest.raises(torch.OutOfMemoryError):
        strict.step(1)  # actmax is due from step 1 on
    strict.close()


SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from _models import TinyCNN, make_batch
    from cnnvis_tb import VisLogger
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(3, n=2)
    vis = VisLogger(model, {log_dir!r}, probe=probe, probe_labels=labels, every=1,
                    kinds=["kernels", "gradcam", "histograms"], async_logging=False)  # async: test_async_logging
    step = 0
    while True:
        vis.step(step)
        print(step, flush=True)   # this step is complete
        step += 1
        time.sleep(0.05)
    """
)


def test_sigkill_keeps_every_completed_logging_step(tmp_path):
    log_dir = tmp_path / "run"
    code = SCRIPT.format(tests=os.path.dirname(__file__), log_dir=str(log_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    completed = -1
    try:
        deadline = time.monotonic() + 120
        while completed < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            completed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert completed >= 5, "the training process did not get going"
    acc = read_events(log_dir)
    logged = _steps(acc, "cnnvis/gradcam/body/probe_001")
    assert logged[: completed + 1] == list(range(completed + 1))
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")][: completed + 1] == list(range(completed + 1))


def test_unclosed_logger_is_closed_at_exit(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _models import TinyCNN, make_batch
        from cnnvis_tb import VisLogger
        vis = VisLogger(TinyCNN(), {str(tmp_path)!r}, probe=make_batch(0, n=2)[0], every=1, kinds=["kernels"])
        vis.step(0)
        vis.writer.add_scalar("unflushed", 1.0, 0)   # queued, not yet flushed: only the exit handler saves it
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unflushed" in read_events(tmp_path).Tags()["scalars"]


def _live_objects():
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module aliases warns
        warnings.simplefilter("ignore")
        return len(objects), sum(1 for o in objects if isinstance(o, torch.Tensor))


def test_memory_stays_flat_over_many_logging_steps(tmp_path):
    """100 more logging steps leave no more live tensors or Python objects behind than they found."""
    vis = _vis(tmp_path, kinds=[k for k in KINDS if k != "actmax"])  # 100 actmax steps would be slow
    for step in range(10):  # warm-up: caches, fonts, the writer's queue
        vis.step(step)
    vis.wait()  # no logging step in flight on the worker while counting
    objects_before, tensors_before = _live_objects()
    for step in range(10, 110):
        vis.step(step)
    vis.wait()
    objects_after, tensors_after = _live_objects()
    vis.close()
    assert tensors_after <= tensors_before, f"{tensors_after - tensors_before} tensors kept over 100 logging steps"
    assert objects_after - objects_before < 500, f"{objects_after - objects_before} objects kept"
