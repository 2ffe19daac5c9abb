"""Explanation-quality metrics: the functions against plain references, and the logger's scalars read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _models import TinyCNN, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds.cam_metrics import energy, entropy, pointing, regions, spearman


def _boxes_reference(boxes, h, w):
    out = np.zeros((len(boxes), h, w), bool)
    for n, (x0, y0, x1, y1) in enumerate(boxes):
        for y in range(h):
            for x in range(w):
                out[n, y, x] = x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1
    return out


def test_the_metrics_equal_plain_references():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 6, 7, generator=g)
    maps[3] = 0  # an all-zero map
    maps[4] = 0.5  # a constant map
    boxes = torch.tensor([[0, 0, 3, 3], [2.5, 1, 7, 6], [0, 0, 7, 6], [1, 1, 2, 2], [0, 0, 7, 6]], dtype=torch.float32)
    region = regions(boxes, None, (6, 7))
    assert np.array_equal(region.numpy(), _boxes_reference(boxes.tolist(), 6, 7))
    m, r = maps.numpy(), region.numpy()
    for n in range(5):
        flat = m[n].ravel()
        hit = float(r[n].ravel()[int(np.argmax(flat))]) if flat.max() > flat.min() else 0.0
        assert pointing(maps, region)[n].item() == hit
        share = (flat * r[n].ravel()).sum() / flat.sum() if flat.sum() > 0 else 0.0
        assert energy(maps, region)[n].item() == pytest.approx(share, abs=1e-6)
        p = flat / flat.sum() if flat.sum() > 0 else None
        h = 1.0 if p is None else float(-(p * np.log(np.where(p > 0, p, 1))).sum() / math.log(flat.size))
        assert entropy(maps)[n].item() == pytest.approx(h, abs=1e-5)
    peaked = torch.zeros(1, 4, 4)
    peaked[0, 1, 2] = 1
    assert entropy(peaked).item() == pytest.approx(0.0, abs=1e-6) and pointing(peaked, peaked.bool()).item() == 1.0


def test_spearman_equals_scipys_definition_without_ties():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 50, generator=g), torch.rand(3, 50, generator=g)
    for n in range(3):
        ra, rb = np.argsort(np.argsort(a[n].numpy())), np.argsort(np.argsort(b[n].numpy()))
        rho = 1 - 6 * ((ra - rb) ** 2).sum() / (50 * (50**2 - 1))
        assert spearman(a, b)[n].item() == pytest.approx(rho, abs=1e-5)
    assert spearman(a, a).min().item() == pytest.approx(1.0)
    assert spearman(a, -a).max().item() == pytest.approx(-1.0)


class RedDetector(nn.Module):
    """Class 1 = 'red': its score is the mean redness, seen by a 1x1 conv, so Grad-CAM peaks on the red square."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[0, 1] = -1.0
            self.conv.weight[1, 1] = 1.0
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _red_squares():
    images = torch.full((2, 3, 16, 16), 0.1)
    images[0, 0, 2:6, 3:8] = 1.0
    images[1, 0, 9:14, 10:15] = 1.0
    boxes = torch.tensor([[3, 2, 8, 6], [10, 9, 15, 14]], dtype=torch.float32)
    return images, boxes


def test_the_logger_scores_pointing_energy_entropy_and_stability(tmp_path):
    images, boxes = _red_squares()
    model = RedDetector()
    with VisLogger(model, tmp_path, probe=images, probe_labels=[1, 1], probe_boxes=boxes, kinds=["gradcam"],
                   cam_methods=["gradcam"], layers={"gradcam": ["conv"]}, every=1, strict=True) as vis:
        vis.step(0)
        vis.step(1)
    acc = read_events(tmp_path)
    scalar = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    base = "cnnvis/metrics/gradcam/conv"
    assert scalar[f"{base}/pointing/gradcam/true"] == [1.0, 1.0]
    assert scalar[f"{base}/energy/gradcam/true"][0] > 0.9
    assert 0 < scalar[f"{base}/entropy/gradcam/true"][0] < 0.8
    assert scalar[f"{base}/stability/gradcam/true"] == [pytest.approx(1.0)]  # from the second step on; same model


def test_masks_work_like_boxes(tmp_path):
    images, boxes = _red_squares()
    masks = regions(boxes, None, (16, 16))
    with VisLogger(RedDetector(), tmp_path, probe=images, probe_labels=[1, 1], probe_masks=masks, kinds=["gradcam"],
                   cam_methods=["gradcam"], layers={"gradcam": ["conv"]}, strict=True) as vis:
        vis.step(0)
    assert read_events(tmp_path).Scalars("cnnvis/metrics/gradcam/conv/pointing/gradcam/true")[0].value == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"probe_boxes": [[0, 0, 4, 4]]}, r"one box per probe image: expected 2, got 1"),
    ({"probe_boxes": [[0, 0, 4, 4], [5, 5, 20, 8]]}, r"probe_boxes \[1\] reach outside the 16x16 image"),
    ({"probe_boxes": [[4, 0, 4, 4], [0, 0, 2, 2]]}, r"probe_boxes \[0\] have x0 >= x1 or y0 >= y1"),
    ({"probe_boxes": [[0, 0, 4], [0, 0, 2]]}, r"probe_boxes must be \[N, 4\]"),
    ({"probe_masks": torch.zeros(2, 8, 8, dtype=torch.bool)}, r"probe_masks must be \[N, H, W\] = \[2, 16, 16\]"),
    ({"probe_boxes": [[0, 0, 4, 4], [0, 0, 2, 2]], "kinds": ["kernels"]}, r"add 'gradcam' to kinds"),
])
def test_bad_annotations_fail_in_the_constructor(tmp_path, kwargs, match):
    probe, labels = make_batch(0, n=2)
    with pytest.raises(ValueError, match=match):
        VisLogger(TinyCNN(), tmp_path, probe=probe, probe_labels=labels, **kwargs)


def test_confidence_drop_increase_and_agreement_equal_hand_computations(tmp_path):
    from cnnvis_tb import cam
    from cnnvis_tb.kinds.cam_metrics import spearman as rank_corr

    torch.manual_seed(3)
    model = TinyCNN().eval()
    probe, labels = make_batch(11, n=3)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                   cam_methods=["gradcam", "layercam"], layers={"gradcam": ["body"]}) as vis:
        forwards.clear()
        vis.step(0)
    logging_forwards = len(forwards)
    pred = model(probe).argmax(1)
    distinct = 1 if torch.equal(pred, labels) else 2
    assert logging_forwards == 1 + 2 * distinct  # the shared pass, then one masked probe pass per method and target
    acc = read_events(tmp_path)
    value = {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"]}
    with torch.no_grad():
        y = model(probe).softmax(1).gather(1, labels[:, None])[:, 0]
        maps = {m: cam(model, probe, "body", labels, m) for m in ("gradcam", "layercam")}
        for method, m in maps.items():
            o = model(probe * m[:, None]).softmax(1).gather(1, labels[:, None])[:, 0]
            drop = ((y - o).clamp_min(0) / y).mean().item()
            assert value[f"cnnvis/metrics/gradcam/body/confidence_drop/{method}/true"] == pytest.approx(drop, abs=1e-4)
            assert value[f"cnnvis/metrics/gradcam/body/confidence_increase/{method}/true"] == (o > y).float().mean()
    agreement = rank_corr(maps["gradcam"].flatten(1), maps["layercam"].flatten(1)).mean().item()
    assert value["cnnvis/metrics/gradcam/body/agreement/true"] == pytest.approx(agreement, abs=0.05)
