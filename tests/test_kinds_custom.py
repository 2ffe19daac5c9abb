"""A kind of the user's own, defined in this file only, logged through VisLogger like the built-in ones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _models import TinyCNN, hook_counts, image_at, make_batch, read_events
from torch import nn

from cnnvis_tb import Kind, Needs, VisLogger, tags


class ChannelMeans(Kind):
    """Grey strip per layer: row = probe image, column = channel, brightness = the channel's spatial mean
    (min-max scaled over the picture); also the mean over everything as a scalar."""

    name = "channel_means"
    label = "Channel means"
    every = 3

    def needs(self) -> Needs:
        return Needs(activations=tuple(self.layers))

    def log(self, ctx, out, computed) -> None:
        for layer in self.layers:
            means = ctx.shared.activations[layer].float().mean(dim=(2, 3)).cpu()  # [N, C]
            scaled = (means - means.min()) / (means.max() - means.min()).clamp_min(1e-8)
            out.image(layer, "all", scaled[None])
            out.scalar(layer, "mean", means.mean().item())


class Seen(Kind):
    """Records what the logger hands it: the model's mode inside compute / log, and the steps."""

    name, label, every, layer_role = "seen", "Seen", 2, None
    at_step_zero = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def compute(self, ctx):
        self.calls.append(("compute", ctx.step, ctx.net.training, torch.is_grad_enabled()))
        return ctx.step * 10

    def log(self, ctx, out, computed):
        self.calls.append(("log", ctx.step, ctx.net.training, computed))
        out.text("model", f"seen at {ctx.step}")


class Exploding(ChannelMeans):
    name, label = "exploding", "Exploding"

    def log(self, ctx, out, computed):
        raise RuntimeError("custom kind exploded")


def _channel_means_by_hand(model, probe, layer):
    """The reference: the layer's output on the probe in eval mode, by a hook written here."""
    model = model.eval()
    got = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: got.update(out=o.clone()))
    with torch.no_grad():
        model(probe)
    handle.remove()
    model.train()
    return got["out"].mean(dim=(2, 3))


def test_a_custom_kind_is_logged_in_its_own_tag_family_and_reads_back(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(1, n=4)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, strict=True,
                   kinds=["gradcam", ChannelMeans(layers=["body.0"]), "kernels"], every={"gradcam": 2}) as vis:
        assert vis.kinds == ("gradcam", "kernels", "channel_means")  # built-in kinds first, then the user's
        assert vis.every == {"gradcam": 2, "kernels": 100, "channel_means": 3}
        assert vis.layers["channel_means"] == ["body.0"]
        logged = [s for s in range(7) if vis.step(s)]
    assert logged == [0, 2, 3, 4, 6]
    acc = read_events(tmp_path)
    tag = "cnnvis/channel_means/body.0/all"
    assert [e.step for e in acc.Images(tag)] == [0, 3, 6]
    assert [e.step for e in acc.Scalars("cnnvis/metrics/channel_means/body.0/mean")] == [0, 3, 6]
    # The pixels are the channel means of the model as it was at step 6 (no training here: the same model).
    means = _channel_means_by_hand(model, probe, "body.0")
    expected = (means - means.min()) / (means.max() - means.min())
    pixels = image_at(acc, tag, step=6)
    assert pixels.shape == (4, 16, 3)
    assert np.abs(pixels[..., 0].astype(float) - expected.numpy() * 255).max() <= 1
    assert acc.Scalars("cnnvis/metrics/channel_means/body.0/mean")[-1].value == pytest.approx(means.mean().item())
    # The kinds table tells the tab the label and order of every kind.
    table = acc.Tensors(tags.KINDS_TABLE_TAG + "/text_summary")[0].tensor_proto.string_val[0].decode()
    assert tags.parse_kinds_table(table) == [("gradcam", "Grad-CAM"), ("kernels", "Kernels"),
                                             ("channel_means", "Channel means")]


def test_the_logger_runs_a_custom_kind_under_its_guard_and_schedule(tmp_path):
    model = TinyCNN().train()
    probe, _ = make_batch(2, n=2)
    seen = Seen()
    with torch.no_grad(), VisLogger(model, tmp_path, probe=probe, kinds=[seen], strict=True) as vis:
        assert vis.due(0) == () and vis.due(4) == ("seen",)  # not at step 0; every 2
        for step in range(5):
            vis.step(step)
        vis.log_now(5, kinds=["seen"])
    # eval mode and gradients on inside (the user's loop is in no_grad), training mode back afterwards
    assert seen.calls == [("compute", 2, False, True), ("log", 2, False, 20),
                          ("compute", 4, False, True), ("log", 4, False, 40),
                          ("compute", 5, False, True), ("log", 5, False, 50)]
    assert model.training
    texts = read_events(tmp_path).Tags()["tensors"]
    assert "cnnvis/summary/model/seen/text_summary" in texts


def test_a_custom_kind_shares_the_one_forward_pass(tmp_path):
    model = TinyCNN()
    probe, labels = make_batch(3, n=2)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, strict=True, every=1,
                   kinds=["gradcam", "features", ChannelMeans()], cam_metrics=False) as vis:  # no masked passes
        forwards.clear()
        vis.log_now(1)
    assert len(forwards) == 1


def test_a_failing_custom_kind_warns_once_and_the_built_in_kinds_still_log(tmp_path):
    model = TinyCNN()
    probe, labels = make_batch(4, n=2)
    before = hook_counts(model)
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1,
                       kinds=["gradcam", "kernels", Exploding()]) as vis:
            for step in range(3):
                vis.step(step)
    ours = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    assert len(ours) == 1 and "exploding" in ours[0] and "custom kind exploded" in ours[0]
    acc = read_events(tmp_path)
    families = {t.split("/")[1] for t in acc.Tags()["images"]}
    assert families == {"gradcam", "kernels"}
    assert all(len(acc.Images(t)) == 3 for t in acc.Tags()["images"])
    assert hook_counts(model) == before and torch.equal(torch.get_rng_state(), rng) and model.training


def test_a_failing_custom_kind_raises_under_strict(tmp_path):
    model = TinyCNN()
    probe, _ = make_batch(5, n=2)
    vis = VisLogger(model, tmp_path, probe=probe, kinds=["kernels", Exploding()], strict=True, every=1)
    with pytest.raises(RuntimeError, match="custom kind exploded"):
        vis.step(0)
    assert model.training
    vis.close()


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: type("Clash", (ChannelMeans,), {"name": "gradcam"})(), ValueError,
     r"Clash.name 'gradcam' collides with the built-in kind 'gradcam'; choose another name"),
    (lambda: type("Slashed", (ChannelMeans,), {"name": "my/kind"})(), ValueError,
     r"kind name 'my/kind' holds '/'"),
    (lambda: type("Nameless", (ChannelMeans,), {"name": ""})(), ValueError, r"Nameless has no name"),
    (lambda: type("Reserved", (ChannelMeans,), {"name": "metrics"})(), ValueError, r"'metrics' is reserved"),
    (lambda: type("Spaced", (ChannelMeans,), {"name": "my kind"})(), ValueError, r"must be 1-64 letters"),
    (lambda: ChannelMeans(every=0), ValueError, r"every\['channel_means'\] must be >= 1"),
    (lambda: type("Zero", (ChannelMeans,), {"every": 0})(), ValueError, r"every\['channel_means'\] must be >= 1"),
    (lambda: ChannelMeans(every=2.5), TypeError, r"must be a positive int"),
    (lambda: type("NoLog", (Kind,), {"name": "nolog"})(), TypeError, r"NoLog must define log"),
    (lambda: ChannelMeans, TypeError, r"pass an instance: ChannelMeans\(\)"),
    (lambda: type("Role", (ChannelMeans,), {"layer_role": "some"})(), ValueError, r"layer_role must be one of"),
])
def test_bad_custom_kinds_fail_in_the_constructor(tmp_path, make, error, match):
    probe, _ = make_batch(6, n=2)
    with pytest.raises(error, match=match):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=["kernels", make()])


def test_two_kinds_of_one_name_and_unknown_layers_fail_in_the_constructor(tmp_path):
    probe, _ = make_batch(7, n=2)
    with pytest.raises(ValueError, match="kinds names 'channel_means' twice"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans(), ChannelMeans()])
    with pytest.raises(ValueError, match=r"unknown layer 'body.9'"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans(layers=["body.9"])])
    with pytest.raises(ValueError, match=r"unknown kind 'channel_mean' \(did you mean 'channel_means'\?\)"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans()], every={"channel_mean": 3})
    with pytest.raises(ValueError, match=r"not logged by this VisLogger"):
        VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans()]).log_now(0, kinds=["gradcam"])


def test_layers_mapping_and_every_mapping_reach_a_custom_kind(tmp_path):
    probe, _ = make_batch(8, n=2)
    with VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans(every=7)], every=5,
                   layers={"channel_means": ["stem.0", "body.3"]}) as vis:
        # its own every=7 wins over the one int for all kinds; the mapping names its layers
        assert vis.every == {"channel_means": 7} and vis.layers == {"channel_means": ["stem.0", "body.3"]}
    with VisLogger(TinyCNN(), tmp_path, probe=probe, kinds=[ChannelMeans(every=7)],
                   every={"channel_means": 4}) as vis:
        assert vis.every == {"channel_means": 4}


def _train(log_dir=None):
    torch.manual_seed(99)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe, labels = make_batch(100)
    vis = None if log_dir is None else VisLogger(
        model, log_dir, probe=probe, probe_labels=labels, every=1, strict=True,
        kinds=["gradcam", ChannelMeans(every=1), Seen(every=1)],
    )
    for step in range(12):
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


def test_training_is_bit_identical_with_custom_kinds(tmp_path):
    (ref_model, ref_opt, ref_rng), (model, opt, rng) = _train(), _train(tmp_path)
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    assert all(torch.equal(ref_opt[k]["momentum_buffer"], opt[k]["momentum_buffer"]) for k in ref_opt)
    assert torch.equal(ref_rng, rng)
