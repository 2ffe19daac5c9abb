"""VisLogger end to end: what it orchestrates (tags, schedule of a step, flush, writers, the guard around kinds),
read back with TensorBoard's own loader and decoded. Each kind's own pictures are tested in tests/test_kinds_*.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from _models import TinyCNN, decode_png, image_at, read_events, texts, tiny_logger
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import VisLogger, tags
from cnnvis_tb.demo import ShapesDataset
from cnnvis_tb.kinds import ALL_KINDS, BUILTIN


def test_every_kind_written_under_the_tag_scheme(tmp_path):
    with tiny_logger(tmp_path, every=1, kinds=ALL_KINDS, class_names=["a", "b", "c", "d"]) as vis:
        vis.step(0)
        vis.step(1)
    acc = read_events(tmp_path)
    images = set(acc.Tags()["images"])
    steps = {tag: [0, 1] for tag in images}
    steps.update({f"cnnvis/actmax/{layer}/channels": [1] for layer in vis.layers["actmax"]})  # not at step 0
    steps.update({t: [1] for t in images if t.startswith("cnnvis/deepdream/")})  # not at step 0 either
    layers = vis.layers
    assert layers["gradcam"] == ["body"]
    assert layers["kernels"] == ["stem.0", "body.0", "body.3"] == layers["features"]
    expected = {f"cnnvis/gradcam/body/probe_{i:03d}" for i in range(4)}
    expected |= {f"cnnvis/features/{layer}/probe_{i:03d}" for layer in layers["features"] for i in range(4)}
    expected |= {f"cnnvis/kernels/{layer}/grid" for layer in layers["kernels"]}
    expected |= {f"cnnvis/actmax/{layer}/channels" for layer in layers["actmax"]}
    expected |= {f"cnnvis/deepdream/{layer}/probe_{i:03d}" for layer in layers["deepdream"] for i in range(4)}
    expected |= {f"cnnvis/saliency/input/probe_{i:03d}" for i in range(4)}
    assert images == expected
    for tag in images:
        assert [e.step for e in acc.Images(tag)] == steps[tag], tag
        pixels = image_at(acc, tag)
        assert pixels.ndim == 3 and pixels.std() > 5, f"{tag} is blank"
    histograms = set(acc.Tags()["histograms"])
    assert "cnnvis/histograms/stem.0/weight" in histograms and "cnnvis/histograms/head/bias" in histograms
    assert not any(t.endswith(".grad") for t in histograms)  # no backward ran: no gradient to show
    (table,) = texts(acc, "cnnvis/summary/model/layers/text_summary")  # logged once
    assert table[0] == 0 and "| body.3 | Conv2d | 4×16×8×8 | 1,168 |" in table[1].replace("&nbsp;", "")
    (kinds,) = texts(acc, "cnnvis/summary/model/kinds/text_summary")
    assert tags.parse_kinds_table(kinds[1]) == [(name, BUILTIN[name].label) for name in ALL_KINDS]  # the tab's


def test_events_flushed_after_each_logging_step(tmp_path):
    vis = tiny_logger(tmp_path, every=1, kinds=["gradcam", "kernels"], async_logging=False)  # async: when the worker
    vis.step(0)                                                                                 # finished (other test)
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/gradcam/body/probe_000")] == [0]  # not closed yet
    vis.step(1)
    assert len(read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")) == 2
    vis.close()
    vis.close()  # idempotent


def test_given_writer_is_used_and_left_open(tmp_path):
    writer = SummaryWriter(tmp_path)
    with tiny_logger(None, writer=writer, every=1, kinds=["kernels"]) as vis:
        vis.step(0)
    writer.add_scalar("after", 1.0, 0)  # still open
    writer.close()
    acc = read_events(tmp_path)
    assert "cnnvis/kernels/stem.0/grid" in acc.Tags()["images"] and "after" in acc.Tags()["scalars"]


def test_probe_from_dataset_and_loader_takes_first_samples_without_rng(tmp_path):
    data = ShapesDataset(32, 16, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model = TinyCNN()
    rng = torch.get_rng_state()
    for probe in (data, loader):
        vis = VisLogger(model, tmp_path, probe=probe, probe_size=5)
        assert torch.equal(vis.probe.images, data.images[:5])
        assert torch.equal(vis.probe.labels, data.labels[:5])
        vis.close()
    assert torch.equal(rng, torch.get_rng_state())


def test_grayscale_non_square_input(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(in_channels=1)
    probe = torch.rand(3, 1, 12, 20)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=[0, 1, 2], every=1, kinds=ALL_KINDS, strict=True,
                   actmax_steps=2) as vis:
        vis.step(1)  # every kind due
    acc = read_events(tmp_path)
    strip = image_at(acc, "cnnvis/gradcam/body/probe_000")
    assert strip.shape[1] > strip.shape[0]
    actmax = image_at(acc, "cnnvis/actmax/body.3/channels")
    assert actmax.std() > 1


def test_resnet18_automatic_layers(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    probe = torch.randn(2, 3, 64, 64)
    with VisLogger(model, tmp_path, probe=probe, every=1, kinds=["gradcam", "kernels"], strict=True) as vis:
        assert vis.layers["gradcam"] == ["layer4"]
        assert vis.layers["kernels"][0] == "conv1" and vis.layers["kernels"][-1] == "layer4.1.conv2"
        vis.step(0)
    acc = read_events(tmp_path)
    first = image_at(acc, "cnnvis/kernels/conv1/grid")
    assert first.shape == (1 + 8 * 22, 1 + 8 * 22, 3)  # 64 RGB 7×7 kernels ×3 → 21 px tiles, 8×8 grid
    assert decode_png(acc.Images("cnnvis/gradcam/layer4/probe_001")[0].encoded_image_string).std() > 5


def test_layer_table_follows_the_model_dtype():
    from cnnvis_tb import layer_table

    model = TinyCNN().double()  # float32 sample images must still run through a float64 model
    table = layer_table(model, torch.randn(2, 3, 16, 16))
    assert "| head | Linear | 2×4 | 68 |" in table and model.training




def test_log_now_logs_only_the_kinds_asked_for(tmp_path):
    with tiny_logger(tmp_path, kinds=["gradcam", "kernels", "histograms"]) as vis:
        assert vis.log_now(3, kinds="kernels") is True
        vis.log_now(4, kinds=["histograms", "gradcam"])
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [3]
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [4]
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")] == [4]


def test_pictures_a_kind_made_before_it_failed_are_written(tmp_path, monkeypatch):
    with tiny_logger(tmp_path, kinds=["kernels", "histograms"], every=1, strict=False, async_logging=False) as vis:
        kernels = vis.kind("kernels")

        def half_done(ctx, out, computed):
            out.image("stem.0", "grid", torch.full((3, 4, 4), 0.5))
            raise RuntimeError("failed half-way")

        monkeypatch.setattr(kernels, "log", half_done)
        with pytest.warns(RuntimeWarning, match=r"the kernels visual failed at step 0 .*failed half-way"):
            vis.step(0)
    acc = read_events(tmp_path)
    assert (image_at(acc, "cnnvis/kernels/stem.0/grid") == 128).all()
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")] == [0]


def test_a_failing_shared_pass_warns_once_and_kinds_without_it_still_log(tmp_path):
    model = TinyCNN()
    vis = tiny_logger(tmp_path, model=model, kinds=["gradcam", "features", "kernels"], every=1, strict=False)
    original = model.head.forward

    def broken(x):
        if not model.training:  # only the logger's eval-mode passes fail
            raise ValueError("broken head")
        return original(x)

    model.head.forward = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            vis.step(step)
    vis.close()
    messages = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    assert len(messages) == 1 and "the probe visual failed at step 0" in messages[0] and "broken head" in messages[0]
    acc = read_events(tmp_path)
    assert {t.split("/")[1] for t in acc.Tags()["images"]} == {"kernels"}
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [0, 1, 2]


def test_step_after_close_warns_once_and_logs_nothing(tmp_path):
    vis = tiny_logger(tmp_path, kinds=["kernels"], every=1)
    vis.step(0)
    vis.close()
    with pytest.warns(RuntimeWarning, match=r"vis.step\(1\) after vis.close\(\): nothing is logged"):
        assert vis.step(1) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert vis.step(2) is False
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")] == [0]


def test_the_layer_table_escapes_a_bar_in_a_module_name():
    from cnnvis_tb import layer_table

    model = torch.nn.Sequential()
    model.add_module("a|b", torch.nn.Conv2d(3, 2, 1))
    row = next(line for line in layer_table(model, torch.randn(1, 3, 4, 4)).splitlines() if "Conv2d" in line)
    assert row.startswith("| a\\|b | Conv2d |")
    assert tags.parse_kinds_table("| kind | label |\n| --- | --- |\n| x | " + row.split(" | ")[0][2:] + " |") == [
        ("x", "a|b")]  # read back as written


def test_events_are_on_disk_once_the_worker_finished_a_step(tmp_path):
    """The default (asynchronous) path: a step's events are flushed when the worker finishes it; ``wait()`` waits."""
    vis = tiny_logger(tmp_path, every=1, kinds=["gradcam", "kernels"])
    vis.step(0)
    vis.wait()
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/gradcam/body/probe_000")] == [0]  # not closed yet
    vis.step(1)
    vis.wait()
    assert len(read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")) == 2
    vis.close()
