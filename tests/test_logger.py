"""VisLogger end to end: what it writes, read back with TensorBoard's own loader and decoded."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision
from _models import TinyCNN, decode_png, image_at, make_batch, read_events
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import VisLogger, kernel_grid
from cnnvis_tb.demo import ShapesDataset
from cnnvis_tb.kinds import ALL_KINDS


def _logger(tmp_path, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or TinyCNN()
    probe, labels = make_batch(2, n=kwargs.pop("n", 4))
    kwargs.setdefault("strict", True)
    kwargs.setdefault("actmax_steps", 2)
    return VisLogger(model, tmp_path, probe=probe, probe_labels=labels, **kwargs)


def test_every_kind_written_under_the_tag_scheme(tmp_path):
    with _logger(tmp_path, every=1, kinds=ALL_KINDS, class_names=["a", "b", "c", "d"]) as vis:
        vis.step(0)
        vis.step(1)
    acc = read_events(tmp_path)
    images = set(acc.Tags()["images"])
    steps = {tag: [0, 1] for tag in images}
    steps.update({f"cnnvis/actmax/{layer}/channels": [1] for layer in vis.layers["actmax"]})  # not at step 0
    layers = vis.layers
    assert layers["gradcam"] == ["body"]
    assert layers["kernels"] == ["stem.0", "body.0", "body.3"] == layers["features"]
    expected = {f"cnnvis/gradcam/body/probe_{i:03d}" for i in range(4)}
    expected |= {f"cnnvis/features/{layer}/probe_{i:03d}" for layer in layers["features"] for i in range(4)}
    expected |= {f"cnnvis/kernels/{layer}/grid" for layer in layers["kernels"]}
    expected |= {f"cnnvis/actmax/{layer}/channels" for layer in layers["actmax"]}
    expected |= {f"cnnvis/saliency/input/probe_{i:03d}" for i in range(4)}
    assert images == expected
    for tag in images:
        assert [e.step for e in acc.Images(tag)] == steps[tag], tag
        pixels = image_at(acc, tag)
        assert pixels.ndim == 3 and pixels.std() > 5, f"{tag} is blank"
    histograms = set(acc.Tags()["histograms"])
    assert "cnnvis/histograms/stem.0/weight" in histograms and "cnnvis/histograms/head/bias" in histograms
    assert not any(t.endswith(".grad") for t in histograms)  # no backward ran: no gradient to show
    table = tensor_util.make_ndarray(acc.Tensors("cnnvis/summary/model/layers/text_summary")[0].tensor_proto)
    text = table.item().decode()
    assert "| body.3 | Conv2d | 4×16×8×8 | 1,168 |" in text.replace("&nbsp;", "")
    assert len(acc.Tensors("cnnvis/summary/model/layers/text_summary")) == 1  # logged once


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


def test_schedule_per_kind_and_step_zero(tmp_path):
    with _logger(tmp_path, every={"kernels": 2, "gradcam": 3, "histograms": 5, "features": 4, "actmax": 6}) as vis:
        assert vis.due(0) == ("gradcam", "features", "kernels", "histograms")  # actmax starts at its interval
        for step in range(7):
            vis.step(step)
            vis.step(step)  # a second call at the same step (gradient accumulation) logs nothing more
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [0, 2, 4, 6]
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [0, 3, 6]
    assert [e.step for e in acc.Images("cnnvis/features/body.3/probe_000")] == [0, 4]
    assert [e.step for e in acc.Images("cnnvis/actmax/body.3/channels")] == [6]
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")] == [0, 5]


def test_default_schedule(tmp_path):
    with _logger(tmp_path) as vis:
        assert vis.every == {"kernels": 100, "features": 200, "gradcam": 200, "actmax": 1000, "histograms": 100}
        assert "saliency" not in vis.kinds
        assert vis.due(100) == ("kernels", "histograms") and vis.due(101) == ()


def test_events_flushed_after_each_logging_step(tmp_path):
    vis = _logger(tmp_path, every=1, kinds=["gradcam", "kernels"])
    vis.step(0)
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/gradcam/body/probe_000")] == [0]  # not closed yet
    vis.step(1)
    assert len(read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")) == 2
    vis.close()
    vis.close()  # idempotent


def test_given_writer_is_used_and_left_open(tmp_path):
    writer = SummaryWriter(tmp_path)
    with _logger(None, writer=writer, every=1, kinds=["kernels"]) as vis:
        vis.step(0)
    writer.add_scalar("after", 1.0, 0)  # still open
    writer.close()
    acc = read_events(tmp_path)
    assert "cnnvis/kernels/stem.0/grid" in acc.Tags()["images"] and "after" in acc.Tags()["scalars"]


def test_kernel_grid_pixels_for_hand_set_weights(tmp_path):
    """First-layer RGB kernels are colour patches: 0.5 + 0.5 * w / max|W|, tiles upscaled ×8 from 2×2."""
    model = TinyCNN()
    conv = nn.Conv2d(3, 2, 2, bias=False)
    weight = torch.zeros(2, 3, 2, 2)
    weight[0, 0] = 1.0  # kernel 0: pure red, full strength
    weight[1, 2, 0, 0] = -0.5  # kernel 1: blue at -half strength at top left, 0 elsewhere
    conv.weight.data.copy_(weight)
    model.stem[0] = nn.Sequential(conv, nn.ConvTranspose2d(2, 8, 2))  # keep the rest of the model working
    with _logger(tmp_path, model=model, every=1, kinds=["kernels"], layers={"kernels": ["stem.0.0"]}) as vis:
        vis.step(0)
    grid = image_at(read_events(tmp_path), "cnnvis/kernels/stem.0.0/grid")
    # two tiles of 16×16 (2×2 upscaled ×8), 1 px white padding around and between: 1 + 2 * 17 = 35 wide
    assert grid.shape == (18, 35, 3)
    assert (grid[0] == 255).all() and (grid[:, 17] == 255).all()
    tile0, tile1 = grid[1:17, 1:17], grid[1:17, 18:34]
    assert (tile0 == [255, 128, 128]).all()
    assert (tile1[:8, :8] == [128, 128, 64]).all()  # 0.5 - 0.25 = 0.25 -> 64 in blue
    assert (tile1[8:, 8:] == [128, 128, 128]).all()


def test_kernel_grid_deep_grouped_and_capped():
    depthwise = nn.Conv2d(16, 16, 3, groups=16)
    picture = kernel_grid(depthwise)  # [16, 1, 3, 3]: one heat tile per kernel, 4×4 layout
    assert picture.shape == (3, 1 + 4 * 19, 1 + 4 * 19)
    wide = nn.Conv2d(32, 100, 1)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[0, 0] = 1.0
        wide.weight[0, 1] = -1.0
    picture = kernel_grid(wide, max_kernels=64, max_in_channels=16)
    # 64 rows (cap) × 16 columns of 16 px tiles
    assert picture.shape == (3, 1 + 64 * 17, 1 + 16 * 17)
    red, blue, white = picture[:, 1, 1], picture[:, 1, 18], picture[:, 1, 35]
    assert red[0] > 0.35 and red[2] < 0.2 and blue[2] > 0.35 and blue[0] < 0.1 and (white > 0.95).all()


def test_nan_weights_warn_once_and_still_log(tmp_path):
    vis = _logger(tmp_path, every=1, kinds=["kernels", "histograms"], strict=False)
    with torch.no_grad():
        vis._net.stem[0].weight[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis.step(0)
        vis.step(1)
    vis.close()
    messages = [str(w.message) for w in caught]
    assert sum("NaN or inf" in m for m in messages) == 1
    assert sum("non-finite values left out" in m for m in messages) == 1
    acc = read_events(tmp_path)
    assert len(acc.Images("cnnvis/kernels/stem.0/grid")) == 2
    assert acc.Histograms("cnnvis/histograms/stem.0/weight")[0].histogram_value.num == 8 * 27 - 1


def test_feature_panels_show_the_top_channels(tmp_path):
    class Probe(nn.Module):
        """Channel 2 is by far the most active: it must come first in every panel."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([1.0, 2.0, 9.0, 0.5]).view(4, 1, 1, 1))
                self.conv.bias.zero_()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    images = torch.rand(2, 1, 12, 12)
    with VisLogger(Probe(), tmp_path, probe=images, kinds=["features"], every=1, top_k=2, strict=True) as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    panel = image_at(acc, "cnnvis/features/conv/probe_001")
    assert panel.shape[0] > 48 and panel.shape[1] == 2 + 3 * (48 + 2)  # input + 2 channels, 48 px tiles
    from cnnvis_tb.kinds.features import top_channels

    idx, _ = top_channels(Probe().conv(images), 2)
    assert idx[:, 0].tolist() == [2, 2]


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


def test_background_actmax_uses_the_snapshot_and_close_waits(tmp_path):
    import copy

    torch.manual_seed(0)
    model = TinyCNN()
    frozen = copy.deepcopy(model)
    probe, labels = make_batch(2, n=2)
    common = {"probe": probe, "probe_labels": labels, "every": 1, "kinds": ["actmax"], "strict": True,
              "actmax_steps": 4}
    vis = VisLogger(model, tmp_path / "bg", actmax_background=True, **common)
    vis.step(1)
    with torch.no_grad():  # training goes on and changes the model while the worker optimizes
        for p in model.parameters():
            p.add_(1.0)
    vis.close()  # waits for the worker
    with VisLogger(frozen, tmp_path / "sync", **common) as reference:
        reference.step(1)
    bg, sync = read_events(tmp_path / "bg"), read_events(tmp_path / "sync")
    tag = "cnnvis/actmax/body.3/channels"
    assert [e.step for e in bg.Images(tag)] == [1]
    assert np.array_equal(image_at(bg, tag), image_at(sync, tag))


def test_layer_table_follows_the_model_dtype():
    from cnnvis_tb import layer_table

    model = TinyCNN().double()  # float32 sample images must still run through a float64 model
    table = layer_table(model, torch.randn(2, 3, 16, 16))
    assert "| head | Linear | 2×4 | 68 |" in table and model.training


def test_schedule_starts_activation_maximization_at_its_interval(tmp_path):
    with _logger(tmp_path) as vis:  # the default schedule
        assert vis.due(0) == ("gradcam", "features", "kernels", "histograms")
        assert "actmax" not in vis.due(200) and vis.due(1000) == vis.kinds
    with _logger(tmp_path / "every", every={"actmax": 3}, kinds=["actmax", "kernels"]) as vis:
        logged = [s for s in range(7) if vis.step(s)]
        vis.log_now(7, kinds=["actmax"])  # asked for explicitly: logged whatever the schedule says
    acc = read_events(tmp_path / "every")
    assert [e.step for e in acc.Images("cnnvis/actmax/" + vis.layers["actmax"][0] + "/channels")] == [3, 6, 7]
    assert logged == [0, 3, 6]  # kernels at 0 (every 100), actmax at 3 and 6


def test_saliency_methods_side_by_side_equal_the_functional_maps(tmp_path):
    """The saliency strip: input, then one map per method, each the functional API's map of the true class."""
    from cnnvis_tb import saliency
    from cnnvis_tb.render import colorize, fit, to_uint8

    methods = ("guided", "vanilla", "smoothgrad")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    probe, _ = make_batch(2, n=4)
    with torch.no_grad():
        labels = (model(probe).argmax(dim=1) + 1) % 4  # true classes that are not the predicted ones
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["saliency"], saliency_methods=methods,
                   seed=3, strict=True) as vis:
        vis.log_now(5)
    acc = read_events(tmp_path)
    pixels = image_at(acc, "cnnvis/saliency/input/probe_001", step=5)
    assert pixels.shape[1] == 2 + 4 * (96 + 2)  # input and three maps, 96 px each, 2 px apart
    for column, method in enumerate(methods, start=1):
        maps = saliency(model, probe, labels, method=method, seed=3)
        expected = to_uint8(fit(colorize(maps[1:2], "inferno"), 96, 96)[0]).permute(1, 2, 0).numpy()
        left = 2 + column * (96 + 2)
        shown = pixels[2 : 2 + 96, left : left + 96]
        assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1, method
    # the three maps differ from one another: they are not one map drawn three times
    panels = [pixels[2:98, 2 + c * 98 : 98 + c * 98].astype(int) for c in (1, 2, 3)]
    assert all(np.abs(a - b).mean() > 3 for i, a in enumerate(panels) for b in panels[i + 1 :])


def test_saliency_method_errors_are_raised_in_the_constructor(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown saliency method 'smooth' \\(did you mean 'smoothgrad'\\?\\)"):
        _logger(tmp_path, kinds=["saliency"], saliency_methods=["vanilla", "smooth"])
    no_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="guided backpropagation needs ReLU activations"):
        _logger(tmp_path, model=no_relu, kinds=["saliency"], saliency_methods="guided")
    with pytest.raises(ValueError, match="saliency_methods must name at least one"):
        _logger(tmp_path, kinds=["saliency"], saliency_methods=[])


def test_a_failing_saliency_method_leaves_the_others_and_warns_once(tmp_path, monkeypatch):
    import pytest

    from cnnvis_tb.kinds import saliency as saliency_module

    real = saliency_module.input_gradients

    def flaky(net, images, targets, method, **kwargs):
        if method == "guided":
            raise RuntimeError("out of memory (simulated)")
        return real(net, images, targets, method, **kwargs)

    monkeypatch.setattr(saliency_module, "input_gradients", flaky)
    with _logger(tmp_path, kinds=["saliency", "histograms"], saliency_methods=("vanilla", "guided", "smoothgrad"),
                 strict=False) as vis:
        with pytest.warns(RuntimeWarning, match=r"the saliency \(guided\) visual failed at step 0.*simulated") as rec:
            vis.log_now(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same failure does not warn again
            vis.log_now(1)
    assert sum("saliency (guided)" in str(w.message) for w in rec) == 1
    acc = read_events(tmp_path)
    pixels = image_at(acc, "cnnvis/saliency/input/probe_000", step=1)
    assert pixels.shape[1] == 2 + 3 * (96 + 2)  # input, gradient, SmoothGrad
    assert "cnnvis/histograms/stem.0/weight" in acc.Tags()["histograms"]
