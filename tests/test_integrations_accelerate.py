"""Hugging Face Accelerate: VisLogger writes through Accelerator(log_with="tensorboard")'s own writer."""

from __future__ import annotations

import os

import pytest
import torch
from _models import TinyCNN, make_batch, read_events

from cnnvis_tb import VisLogger

try:
    from accelerate import Accelerator
except ImportError:  # pragma: no cover - installed by .[test]
    Accelerator = None
    if os.environ.get("CI") == "true":
        raise


@pytest.mark.skipif(Accelerator is None, reason="accelerate is not installed (pip install -e '.[test]')")
def test_vislogger_on_the_main_process_writes_through_the_accelerator_tracker(tmp_path):
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run1")
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    probe, labels = make_batch(0, n=2)
    vis = None
    if accelerator.is_main_process:
        vis = VisLogger(model, writer=writer, probe=probe, probe_labels=labels, kinds=["gradcam", "kernels"],
                        every=2, strict=True)
    for step in range(5):
        x, y = make_batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        accelerator.log({"train/loss": loss.item()}, step=step)
        if vis is not None:
            vis.step(step)
    if vis is not None:
        vis.close()  # flushes the tracker's writer, never closes it: Accelerate does
    accelerator.end_training()
    acc = read_events(tmp_path / "run1")
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [0, 2, 4]
    assert "train/loss" in acc.Tags()["scalars"]
