"""Panel records: where each panel of a picture lies and what its caption says, written beside the pictures and
served by the plugin's ``/panels`` route (the tab shows one panel alone and its caption as text)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _models import TinyCNN, image_at, make_batch, read_events, texts
from test_plugin_backend import ROUTE, serve

from cnnvis_tb import VisLogger, cam, tags
from cnnvis_tb.render import denormalize, fit, overlay_heatmap, to_uint8


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("panels")
    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(2, n=4)
    vis = VisLogger(model, root / "run", probe=probe, probe_labels=labels, strict=True, actmax_steps=2,
                    kinds=["gradcam", "features", "actmax", "saliency"], every=2, cam_methods=["gradcam", "gradcam++"],
                    layers={"gradcam": ["body"]}, class_names=list("abcd"))
    with vis:
        for step in range(3):
            vis.step(step)
    return root, SimpleNamespace(model=model, probe_images=probe, probe_labels=labels, layers=vis.layers)


def test_gradcam_panels_say_where_each_map_lies_and_what_its_caption_says(logged):
    root, vis = logged
    acc = read_events(root / "run")
    records = texts(acc, tags.panels_tag("gradcam", "body") + "/text_summary")
    assert [step for step, _ in records] == [0, 2]
    model = vis.model.eval()
    probe, labels = vis.probe_images, vis.probe_labels
    with torch.no_grad():
        probs = model(probe).softmax(1)
    model.train()
    pred = probs.argmax(1)
    views = tags.parse_panels_text(records[-1][1])
    assert sorted(views) == [tags.probe_view(i) for i in range(len(probe))]
    shown = denormalize(probe, None, None)
    for i in range(len(probe)):
        panels = views[tags.probe_view(i)]
        assert [p["key"] for p in panels] == ["input", "gradcam/true", "gradcam/pred", "gradcam++/true",
                                              "gradcam++/pred"]
        assert [p["label"] for p in panels] == ["input", "Grad-CAM · true", "Grad-CAM · pred", "Grad-CAM++ · true",
                                                "Grad-CAM++ · pred"]
        assert panels[0]["text"] == ["input", f"true: {'abcd'[labels[i]]}"]
        for p, (method, key, cls) in zip(panels[1:], [
            ("Grad-CAM", "true", labels[i]), ("Grad-CAM", "pred", pred[i]),
            ("Grad-CAM++", "true", labels[i]), ("Grad-CAM++", "pred", pred[i])], strict=True):
            assert p["text"] == [method, f"{key}: {'abcd'[cls]} · {probs[i, cls]:.0%}"]
        # The box holds exactly that map's overlay: cut out of the logged strip, it equals the overlay made here.
        strip = image_at(acc, tags.image_tag("gradcam", "body", tags.probe_view(i)), 2).astype(int)
        maps = cam(vis.model, probe[i:i + 1], "body", [int(pred[i])], "gradcam++")
        expected = to_uint8(fit(overlay_heatmap(shown[i:i + 1], maps), 96, 96))[0].permute(1, 2, 0).numpy()
        x, y, w, h = panels[4]["box"]
        assert np.abs(strip[y:y + h, x:x + w] - expected.astype(int)).mean() < 1.0


def test_feature_and_actmax_panels_name_their_channels(logged):
    root, vis = logged
    acc = read_events(root / "run")
    layer = vis.layers["features"][0]
    (step, text), *_ = texts(acc, tags.panels_tag("features", layer) + "/text_summary")
    panels = tags.parse_panels_text(text)[tags.probe_view(0)]
    with torch.no_grad():
        acts = {}
        module = dict(vis.model.named_modules())[layer]
        handle = module.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach().clone()))
        vis.model.eval()(vis.probe_images)
        handle.remove()
        vis.model.train()
    top = acts["a"][0].mean(dim=(1, 2)).topk(len(panels) - 1).indices.tolist()
    assert [p["key"] for p in panels] == ["input"] + [f"top_{r + 1}" for r in range(len(top))]
    assert [p["text"][0] for p in panels[1:]] == [f"channel {c}" for c in top]
    strip = image_at(acc, tags.image_tag("features", layer, tags.probe_view(0)), step)
    for p in panels:  # every box lies inside the picture, none overlaps another
        x, y, w, h = p["box"]
        assert x + w <= strip.shape[1] and y + h <= strip.shape[0]
    cells = {tuple(p["box"][:2]) for p in panels}
    assert len(cells) == len(panels)
    actmax_layer = vis.layers["actmax"][0]
    (_, text), *_ = texts(acc, tags.panels_tag("actmax", actmax_layer) + "/text_summary")
    channels = [p["text"][0] for p in tags.parse_panels_text(text)["channels"]]
    assert channels and all(c.startswith("channel ") for c in channels)


def test_panels_route_serves_them_per_step_and_the_text_route_leaves_them_out(logged):
    root, _ = logged
    client = serve(root).client
    tag = tags.image_tag("gradcam", "body", tags.probe_view(1))
    response = client.get(f"{ROUTE}/panels", query_string={"run": "run", "tag": tag})
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = json.loads(response.get_data())
    assert answer["run"] == "run" and answer["tag"] == tag
    assert sorted(answer["steps"], key=int) == ["0", "2"]
    written = tags.parse_panels_text(texts(read_events(root / "run"), tags.panels_tag("gradcam", "body")
                                           + "/text_summary")[0][1])
    assert answer["steps"]["0"] == written[tags.probe_view(1)]
    kernels = tags.image_tag("kernels", "stem.0", "grid")  # a kind without panels
    response = client.get(f"{ROUTE}/panels", query_string={"run": "run", "tag": kernels})
    assert json.loads(response.get_data())["steps"] == {}
    response = client.get(f"{ROUTE}/text", query_string={"run": "run"})
    assert not [t for t in json.loads(response.get_data())["texts"] if t["tag"].endswith(".panels/text_summary")]
    response = client.get(f"{ROUTE}/panels", query_string={"run": "run", "tag": "cnnvis/summary/x/y"})
    assert response.status_code == 400


def test_parse_panels_text_drops_what_does_not_parse():
    good = {"key": "input", "label": "input", "box": [2, 2, 8, 8], "text": ["input"]}
    text = tags.panels_text({"probe_000": [good, {"key": 3, "box": [1, 2, 3, 4]}, {"key": "x", "box": [1, -2, 3, 4]},
                                           {"key": "y", "box": [1, 2, 3], "text": []}], "probe_001": "no list"})
    assert tags.parse_panels_text(text) == {"probe_000": [good]}
    unlabelled = tags.panels_text({"probe_000": [{"key": "k", "box": [0, 0, 1, 1], "text": []}]})
    assert tags.parse_panels_text(unlabelled)["probe_000"][0]["label"] == "k"
    assert tags.parse_panels_text("not json") == {}
    assert tags.parse_panels_text("```json\n[1, 2]\n```") == {}
