"""Explanation-quality metrics: the functions against plain references, and the logger's scalars read back."""

from __future__ import annotations

import contextlib
import functools
import math
import re

import numpy as np
import pytest
import torch
from _models import TinyCNN, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger, tags
from cnnvis_tb.kinds.cam_metrics import (
    DELETION_STEPS,
    blur,
    deletion_insertion,
    energy,
    entropy,
    pointing,
    regions,
    spearman,
    top_iou,
)


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


def test_ties_take_ordinal_ranks_in_order_of_position():
    """Maps with ties (a map that is 0 outside its blob) rank tied pixels by position, as a stable double argsort
    would: numpy's, in the test."""
    from cnnvis_tb.kinds.cam_metrics import _ranks

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 4, (5, 64), generator=g).float()  # many ties
    expected = np.argsort(np.argsort(x.numpy(), axis=1, kind="stable"), axis=1, kind="stable")
    assert np.array_equal(_ranks(x).numpy(), expected.astype(np.float32))
    ra = expected - expected.mean(axis=1, keepdims=True)
    b = torch.rand(5, 64, generator=g)
    rb = np.argsort(np.argsort(b.numpy(), axis=1), axis=1)
    rb = rb - rb.mean(axis=1, keepdims=True)
    rho = (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    assert np.allclose(spearman(x, b).numpy(), rho, atol=1e-5)


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
    ({"cam_metrics": "cheap", "kinds": ["features"]}, r"cam_metrics='cheap' asks for the CAM metrics.*add it"),
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
    # deletion / insertion at the default cam_metrics: the first method's map of the predicted class only, so the 2N
    # end points and 2 (S - 1) perturbed images per image, in passes of cam_batch_size (64); they run on a frozen
    # copy of the model, which carries the counting hook along
    perturbed = 2 * 3 + 2 * (DELETION_STEPS - 1) * 3
    # the shared pass, one masked probe pass per method and target set, the deletion / insertion passes
    assert logging_forwards == 1 + 2 * distinct + math.ceil(perturbed / 64)
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


# --- IoU of the top area, deletion / insertion, the cheap / costly switch, per-image values ---------------------------


def _top_iou_reference(maps, region, fraction=0.15):
    out = []
    for m, r in zip(maps.numpy(), region.numpy(), strict=True):
        flat, obj = m.ravel(), r.ravel()
        k = math.ceil(fraction * flat.size)
        top = np.zeros(flat.size, bool)
        top[np.argsort(-flat, kind="stable")[:k]] = True
        top &= flat > flat.min()  # pixels at the map's minimum are never "top"
        union = (top | obj).sum()
        out.append((top & obj).sum() / union if union else 0.0)
    return np.array(out)


def test_top_iou_equals_a_plain_reference():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(6, 10, 12, generator=g)
    maps[1] = 0  # constant: no top area
    maps[2] = torch.where(maps[2] > 0.95, maps[2], torch.zeros(()))  # positive on fewer than 15 % of the pixels
    maps[3] = (maps[3] * 4).round()  # many ties
    maps[5] = 0
    boxes = torch.tensor([[0, 0, 6, 5], [1, 1, 9, 9], [0, 0, 12, 10], [3, 2, 8, 7], [5, 5, 6, 6], [0, 0, 1, 1]],
                         dtype=torch.float32)
    region = regions(boxes, None, (10, 12))
    region[4] = False  # an empty object
    assert np.allclose(top_iou(maps, region).numpy(), _top_iou_reference(maps, region), atol=1e-6)
    assert top_iou(maps, region)[1].item() == 0.0 and top_iou(maps, region)[5].item() == 0.0
    exact = torch.zeros(1, 10, 10)
    exact[0, :3, :5] = torch.rand(3, 5, generator=g) + 1  # 15 pixels = the top 15 %, exactly the object
    assert top_iou(exact, exact.bool()).item() == 1.0


def _blur_reference(images, sigma):
    """Gaussian of ``sigma`` truncated at 3 sigma, edges replicated (clamped indices), summed pixel by pixel."""
    x = images.double().numpy()
    _, _, h, w = x.shape
    r = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.zeros_like(x)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, xs = np.clip(np.arange(h) + dy, 0, h - 1), np.clip(np.arange(w) + dx, 0, w - 1)
            out += k[dy + r] * k[dx + r] * x[:, :, ys][:, :, :, xs]
    return out


def test_blur_equals_a_plain_reference_and_scipy():
    images = torch.rand(2, 3, 9, 14, generator=torch.Generator().manual_seed(5))
    for sigma in (1.0, 2.0, 0.7):
        assert np.allclose(blur(images, sigma).numpy(), _blur_reference(images, sigma), atol=1e-5)
    assert np.allclose(blur(images).numpy(), _blur_reference(images, 1.0), atol=1e-5)  # 9 px: sigma 1
    ndimage = pytest.importorskip("scipy.ndimage")
    expected = ndimage.gaussian_filter(images.double().numpy(), sigma=(0, 0, 2, 2), mode="nearest", truncate=3.0)
    assert np.allclose(blur(images, 2.0).numpy(), expected, atol=1e-5)


def _deletion_insertion_reference(model, images, maps, classes, steps, start):
    """One image, one step, one forward at a time: ``(deletion [N], insertion [N])`` AUCs, trapezoids summed by hand."""
    n, _, h, w = images.shape
    pixels = h * w
    size = math.ceil(pixels / steps)
    counts = list(range(0, pixels, size)) + [pixels]
    fractions = [k / pixels for k in counts]
    aucs = []
    for i in range(n):
        order = np.argsort(-maps[i].numpy().ravel(), kind="stable")  # most important first, ties in row-major order
        curves = ([], [])
        for k in counts:
            chosen = np.zeros(pixels, bool)
            chosen[order[:k]] = True
            chosen = torch.from_numpy(chosen.reshape(h, w))
            deleted = images[i].clone()
            deleted[:, chosen] = 0.0
            inserted = start[i].clone()
            inserted[:, chosen] = images[i][:, chosen]
            with torch.no_grad():
                for curve, x in zip(curves, (deleted, inserted), strict=True):
                    curve.append(model(x[None]).softmax(1)[0, int(classes[i])].item())
        aucs.append([sum((c[j] + c[j + 1]) / 2 * (fractions[j + 1] - fractions[j]) for j in range(len(counts) - 1))
                     for c in curves])
    return np.array(aucs)[:, 0], np.array(aucs)[:, 1]


def _maps_with_ties(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, h, w, generator=g)
    maps[0] = (maps[0] * 3).floor()  # ties everywhere
    maps[-1] = 0  # all zero: row-major order
    return maps


@pytest.mark.parametrize("steps", [8, 10])  # 256 pixels: 8 equal groups; 10 groups of 26 and a last one of 22
def test_deletion_insertion_equals_a_plain_reference(steps):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images, _ = make_batch(21, n=4)
    maps = _maps_with_ties(6, 16, 16, 6)
    owner, classes = torch.tensor([0, 1, 2, 3, 1, 0]), torch.tensor([0, 3, 1, 2, 2, 0])
    start = torch.from_numpy(_blur_reference(images, 1.0)).float()
    d, i = deletion_insertion(lambda x: model(x).softmax(1), images, maps, classes, owner=owner, steps=steps,
                              batch_size=7)  # batches that cut across maps and curves
    ref_d, ref_i = _deletion_insertion_reference(model, images[owner], maps, classes, steps, start[owner])
    assert np.allclose(d.numpy(), ref_d, atol=1e-5) and np.allclose(i.numpy(), ref_i, atol=1e-5)
    assert ((0 <= d) & (d <= 1) & (0 <= i) & (i <= 1)).all()
    *_, fractions, dcurve, icurve = deletion_insertion(lambda x: model(x).softmax(1), images, maps, classes,
                                                       owner=owner, steps=steps, curves=True)
    full = model(images).softmax(1)[owner, classes]
    assert fractions[0] == 0 and fractions[-1] == 1 and len(fractions) == (steps + 1)
    assert torch.allclose(dcurve[:, 0], full, atol=1e-6) and torch.allclose(icurve[:, -1], full, atol=1e-6)


def test_deletion_insertion_equals_torchcams_metric():
    """torch-cam's ``DeletionInsertionMetric`` has the same definition (ranks by decreasing map value, ties in index
    order, ``ceil(H·W / steps)`` pixels a step, trapezoids over the perturbed fraction) with one baseline for both
    curves; RISE (and we) start insertion from a blurred image, so its deletion is run with the zero baseline and
    its insertion with ``baseline=blur``. Its CAM extractor is replaced by one handing it our maps."""
    metrics = pytest.importorskip("torchcam.metrics")
    torch.manual_seed(1)
    model = TinyCNN().eval()
    images, labels = make_batch(22, n=3)
    maps = _maps_with_ties(3, 16, 16, 7)

    class GivenMaps:  # the _CAMExtractor protocol of torchcam.metrics
        def __init__(self):
            self.model, self.maps = model, None

        def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
            return [self.maps]

        def fuse_cams(self, cams):
            return cams[0]

        def _hooks_off(self):
            return contextlib.nullcontext()

    extractor = GivenMaps()
    softmax = functools.partial(torch.softmax, dim=-1)
    ours = deletion_insertion(lambda x: model(x).softmax(1), images, maps, labels, steps=10)
    for n in range(3):
        extractor.maps = maps[n:n + 1]
        theirs = []
        for baseline, key in ((None, "deletion_auc"), (blur, "insertion_auc")):
            metric = metrics.DeletionInsertionMetric(extractor, softmax, steps=10, baseline=baseline)
            metric.update(images[n:n + 1], [int(labels[n])])
            theirs.append(metric.summary()[key])
        assert ours[0][n].item() == pytest.approx(theirs[0], abs=1e-5)
        assert ours[1][n].item() == pytest.approx(theirs[1], abs=1e-5)


class SharpRedDetector(nn.Module):
    """Class 1 = 'strongly red': 400 × the mean of relu(R − G − 0.7) over the image (class 0's logit is 0): only
    unblurred red pixels count, so deleting the red square (0 = grey) or blurring it takes class 1's probability from
    0.94 to 0.5 and nothing else matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(-0.7)
            self.fc.weight.copy_(torch.tensor([[0.0], [400.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_a_map_on_the_object_deletes_faster_and_inserts_faster_than_a_random_map(tmp_path):
    images = torch.full((2, 3, 32, 32), 0.1)
    images[0, 0, 4:10, 6:12] = 1.0
    images[1, 0, 20:26, 17:23] = 1.0
    boxes = torch.tensor([[6, 4, 12, 10], [17, 20, 23, 26]], dtype=torch.float32)
    model = SharpRedDetector().eval()
    on_object = regions(boxes, None, (32, 32)).float()
    random_maps = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(8))
    classes = torch.tensor([1, 1])

    def predict(x):
        return model(x).softmax(1)

    assert predict(images)[:, 1].min() > 0.9 and predict(blur(images))[:, 1].max() < 0.51  # blurring removes it
    d_obj, i_obj = deletion_insertion(predict, images, on_object, classes)
    d_rnd, i_rnd = deletion_insertion(predict, images, random_maps, classes)
    assert (d_obj < d_rnd - 0.2).all(), (d_obj, d_rnd)  # lower deletion AUC is better
    assert (i_obj > i_rnd + 0.1).all(), (i_obj, i_rnd)  # higher insertion AUC is better
    inverted = 1 - on_object  # the background first: the worst ranking
    assert (deletion_insertion(predict, images, inverted, classes)[0] > d_rnd).all()
    with VisLogger(model, tmp_path, probe=images, probe_labels=[1, 1], kinds=["gradcam"], cam_methods=["gradcam"],
                   layers={"gradcam": ["conv"]}, strict=True) as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    deletion = acc.Scalars("cnnvis/metrics/gradcam/conv/deletion/gradcam/pred")[0].value
    insertion = acc.Scalars("cnnvis/metrics/gradcam/conv/insertion/gradcam/pred")[0].value
    assert deletion < d_rnd.mean().item() - 0.2  # Grad-CAM finds the square: it deletes like the object map
    assert deletion == pytest.approx(d_obj.mean().item(), abs=0.02)
    assert insertion > i_rnd.mean().item() + 0.1


def test_the_logger_logs_deletion_insertion_iou_and_per_image_pointing(tmp_path):
    from cnnvis_tb import cam

    torch.manual_seed(3)
    model = TinyCNN().eval()
    probe, labels = make_batch(12, n=4)
    boxes = torch.tensor([[0, 0, 8, 8], [4, 4, 16, 12], [2, 0, 10, 16], [8, 8, 16, 16]], dtype=torch.float32)
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, probe_boxes=boxes, kinds=["gradcam"],
                   strict=True, cam_methods=["gradcam", "gradcam++"], layers={"gradcam": ["body"]},
                   cam_batch_size=5, cam_metrics="all") as vis:
        vis.step(0)
    acc = read_events(tmp_path)
    value = {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"]}
    base = "cnnvis/metrics/gradcam/body"
    pred = model(probe).argmax(1)
    assert not torch.equal(pred, labels)  # the two target sets differ: images with a right prediction are shared
    start = torch.from_numpy(_blur_reference(probe, 1.0)).float()
    region = regions(boxes, None, (16, 16))
    for key, classes in (("true", labels), ("pred", pred)):
        for method in ("gradcam", "gradcam++"):
            maps = cam(model, probe, "body", classes, method)
            ref_d, ref_i = _deletion_insertion_reference(model, probe, maps, classes, DELETION_STEPS, start)
            assert value[f"{base}/deletion/{method}/{key}"] == pytest.approx(ref_d.mean(), abs=1e-3)
            assert value[f"{base}/insertion/{method}/{key}"] == pytest.approx(ref_i.mean(), abs=1e-3)
            assert value[f"{base}/iou/{method}/{key}"] == pytest.approx(_top_iou_reference(maps, region).mean(),
                                                                        abs=1e-6)
            flat = maps.flatten(1)
            hits = [float(region[n].flatten()[int(flat[n].argmax())]) if flat[n].max() > flat[n].min() else 0.0
                    for n in range(4)]
            assert [value[f"{base}/pointing/{method}/{key}/probe_{n:03d}"] for n in range(4)] == hits
            assert value[f"{base}/pointing/{method}/{key}"] == pytest.approx(np.mean(hits))
    per_image = [t for t in value if tags.metric_probe_index(t) is not None]
    assert len(per_image) == 4 * 2 * 2 and all("/pointing/" in t for t in per_image)  # only the pointing game


@pytest.mark.parametrize("setting", ["all", True, "default", "cheap", False])
def test_cam_metrics_cheap_leaves_out_the_metrics_that_run_the_model(tmp_path, setting):
    torch.manual_seed(3)
    model = TinyCNN().eval()
    probe, labels = make_batch(13, n=3)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with VisLogger(model, tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                   cam_methods=["gradcam"], layers={"gradcam": ["body"]}, cam_metrics=setting,
                   **({} if setting is False else {"probe_boxes": [[0, 0, 8, 8]] * 3})) as vis:
        forwards.clear()
        vis.step(0)
    metrics = {t.split("/")[4] for t in read_events(tmp_path).Tags()["scalars"]}
    costly = {"deletion", "insertion", "confidence_drop", "confidence_increase"}
    cheap = {"pointing", "energy", "iou", "entropy"}
    if setting is False:
        assert metrics == set() and len(forwards) == 1
    elif setting == "cheap":
        assert metrics == cheap and len(forwards) == 1  # the shared pass only
    else:
        assert metrics == cheap | costly and len(forwards) > 1


@pytest.mark.parametrize("async_logging", [True, False])
def test_by_default_deletion_insertion_score_the_first_methods_map_of_the_predicted_class(tmp_path, async_logging):
    """cam_metrics=True: deletion / insertion for the first method and the predicted class only (the costliest
    metric, once per image); the confidence measures and the map metrics for every method and target. The values
    equal those of cam_metrics='all', whether they ran on a frozen copy on the worker or on the model."""
    torch.manual_seed(3)
    model = TinyCNN().eval()
    probe, labels = make_batch(12, n=4)
    common = dict(probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True, layers={"gradcam": ["body"]},
                  cam_methods=["gradcam++", "gradcam"], async_logging=async_logging)
    values = {}
    for setting in (True, "all"):
        log_dir = tmp_path / str(setting)
        with VisLogger(model, log_dir, cam_metrics=setting, **common) as vis:
            vis.step(0)
        acc = read_events(log_dir)
        values[setting] = {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"]}
    base = "cnnvis/metrics/gradcam/body"
    assert not torch.equal(model(probe).argmax(1), labels)  # the true and predicted target sets differ
    scored = {t for t in values[True] if "/deletion/" in t or "/insertion/" in t}
    assert scored == {f"{base}/deletion/gradcam++/pred", f"{base}/insertion/gradcam++/pred"}
    for target in ("true", "pred"):
        for method in ("gradcam", "gradcam++"):
            assert f"{base}/confidence_drop/{method}/{target}" in values[True]
            assert f"{base}/deletion/{method}/{target}" in values["all"]
    assert all(values["all"][t] == pytest.approx(v, abs=1e-6) for t, v in values[True].items())


def test_with_async_logging_the_metrics_that_run_the_model_run_on_a_copy_on_the_worker(tmp_path):
    """The training thread runs the shared pass only; the masked and perturbed forwards run on the worker, on a
    frozen copy of the model taken at the logging step (a later change of the weights does not reach them); with
    background_metrics=False they run on the training thread, on the model."""
    import threading

    from cnnvis_tb.kinds.gradcam import GradCam

    seen = []

    class Recorded(TinyCNN):  # which thread runs which module (not a hook: a model with hooks stays on the thread)
        def forward(self, x):
            seen.append((threading.current_thread().name, self))
            return super().forward(x)

    torch.manual_seed(3)
    model = Recorded().eval()
    probe, labels = make_batch(12, n=4)
    for background, log_dir in ((True, tmp_path / "bg"), (False, tmp_path / "fg")):
        with VisLogger(model, log_dir, probe=probe, probe_labels=labels, strict=True, layers={"gradcam": ["body"]},
                       kinds=[GradCam(methods=["gradcam"], background_metrics=background)]) as vis:
            seen.clear()  # the constructor's forward pass
            vis.step(0)
            before = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():  # the training loop goes on: the copy is not affected
                for p in model.parameters():
                    p.add_(1.0)
            vis.wait()
            with torch.no_grad():
                for p, b in zip(model.parameters(), before, strict=True):
                    p.copy_(b)
        on_thread = [m for name, m in seen if name == threading.current_thread().name]
        elsewhere = [m for name, m in seen if name != threading.current_thread().name]
        if background:
            assert len(on_thread) == 1 and on_thread[0] is model  # the shared pass
            assert elsewhere and all(m is not model for m in elsewhere)  # the copy's forwards, on the worker
        else:
            assert len(on_thread) > 1 and all(m is model for m in on_thread) and not elsewhere
    for name in ("deletion", "insertion", "confidence_drop"):
        tag = f"cnnvis/metrics/gradcam/body/{name}/gradcam/pred"
        assert read_events(tmp_path / "bg").Scalars(tag)[0].value == pytest.approx(
            read_events(tmp_path / "fg").Scalars(tag)[0].value, abs=1e-6)


@pytest.mark.parametrize("bad", ["fast", "ALL", 1, None, ["cheap"]])
def test_bad_cam_metrics_fail_in_the_constructor(tmp_path, bad):
    probe, labels = make_batch(0, n=2)
    match = (r"cam_metrics must be True or 'default' \(every metric; deletion / insertion only for the first method's "
             r"map of the predicted class\), 'all' .*'cheap' .* or False \(no metric\), got ")
    with pytest.raises(ValueError, match=match + re.escape(repr(bad))):
        VisLogger(TinyCNN(), tmp_path, probe=probe, probe_labels=labels, cam_metrics=bad)
    with pytest.raises(ValueError, match=match):  # also when the gradcam kind is not logged
        VisLogger(TinyCNN(), tmp_path, probe=probe, probe_labels=labels, kinds=["kernels"], cam_metrics=bad)


def test_bad_deletion_steps_fail_in_the_constructor(tmp_path):
    from cnnvis_tb.kinds.gradcam import GradCam

    for bad in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match=r"deletion_steps must be a positive int"):
            GradCam(deletion_steps=bad)
    probe, labels = make_batch(0, n=2)
    with VisLogger(TinyCNN(), tmp_path, probe=probe, probe_labels=labels, strict=True,
                   kinds=[GradCam(deletion_steps=3, methods=["gradcam"])]) as vis:
        vis.step(0)
    assert read_events(tmp_path).Scalars("cnnvis/metrics/gradcam/body/deletion/gradcam/pred")


@pytest.mark.parametrize("async_logging", [True, False])
def test_deletion_insertion_run_every_fourth_grad_cam_step_on_large_inputs(tmp_path, async_logging):
    """Above 64 x 64 pixels deletion / insertion run at multiples of 4 Grad-CAM intervals (step 0 included) and at
    a log_now off the schedule; the other metrics at every logging step. Up to 64 x 64, and with deletion_every=1,
    at every step; deletion_every=2 halves them."""
    from cnnvis_tb.kinds.gradcam import LARGE_INPUT_DELETION_EVERY, GradCam

    assert LARGE_INPUT_DELETION_EVERY == 4
    torch.manual_seed(3)
    model = TinyCNN().eval()

    def steps_of(log_dir, size, kind):
        probe, labels = make_batch(12, n=2, h=size, w=size)
        with VisLogger(model, log_dir, probe=probe, probe_labels=labels, strict=True, layers={"gradcam": ["body"]},
                       kinds=[kind], every=10, async_logging=async_logging) as vis:
            for step in range(0, 100):
                vis.step(step)
            vis.log_now(105)  # off the schedule: asked for, so everything runs
            vis.log_now(110)  # on the schedule (not a multiple of 40): as a scheduled step
        acc = read_events(log_dir)
        tag = "cnnvis/metrics/gradcam/body/{}/gradcam/pred"
        return ([s.step for s in acc.Scalars(tag.format("deletion"))],
                [s.step for s in acc.Scalars(tag.format("insertion"))],
                [s.step for s in acc.Scalars(tag.format("entropy"))])

    every_step = list(range(0, 100, 10)) + [105, 110]
    deletion, insertion, entropy_steps = steps_of(tmp_path / "large", 72, GradCam(methods=["gradcam"]))
    assert deletion == insertion == [0, 40, 80, 105] and entropy_steps == every_step
    deletion, _, _ = steps_of(tmp_path / "small", 64, GradCam(methods=["gradcam"]))
    assert deletion == every_step
    deletion, _, _ = steps_of(tmp_path / "every1", 72, GradCam(methods=["gradcam"], deletion_every=1))
    assert deletion == every_step
    deletion, _, _ = steps_of(tmp_path / "every2", 64, GradCam(methods=["gradcam"], deletion_every=2))
    assert deletion == [0, 20, 40, 60, 80, 105]


def test_bad_deletion_every_fails_in_the_constructor():
    from cnnvis_tb.kinds.gradcam import GradCam

    for bad in (0, -1, 1.5, "4"):
        with pytest.raises(ValueError, match=r"deletion_every must be a positive int"):
            GradCam(deletion_every=bad)


def test_metric_names_of_the_tag_scheme():
    assert tags.cam_metric_name("pointing", "gradcam++", "true") == "pointing/gradcam++/true"
    assert tags.cam_metric_name("pointing", "gradcam", "pred", 3) == "pointing/gradcam/pred/probe_003"
    assert tags.metric_probe_index("pointing/gradcam/pred/probe_003") == 3
    assert tags.metric_probe_index(tags.metric_tag("gradcam", "layer4", "deletion/gradcam/true")) is None
    assert tags.cam_agreement_name("true") == "agreement/true"
    with pytest.raises(ValueError, match=r"method must be a non-empty string without '/'"):
        tags.cam_metric_name("pointing", "a/b", "true")


def test_slow_deletion_insertion_warns_once_with_what_to_do(tmp_path, monkeypatch):
    from cnnvis_tb.kinds import gradcam

    monkeypatch.setattr(gradcam, "SLOW_DELETION_SECONDS", -1.0)  # every run is "slow"
    probe, labels = make_batch(14, n=2)
    with pytest.warns(RuntimeWarning, match=r"deletion / insertion took .* cam_metrics='cheap' leaves them out") as seen:
        with VisLogger(TinyCNN(), tmp_path, probe=probe, probe_labels=labels, kinds=["gradcam"], strict=True,
                       cam_methods=["gradcam"], every=1) as vis:
            vis.step(0)
            vis.step(1)
    assert sum("deletion / insertion took" in str(w.message) for w in seen) == 1


def _quantus():
    """Quantus (installed by ``.[test]``): under CI it must import, locally its absence skips."""
    import os

    if os.environ.get("CI") == "true":
        import quantus

        return quantus
    return pytest.importorskip("quantus", reason="quantus not installed (pip install -e '.[test]')")


def test_pointing_game_equals_quantus_pointing_game():
    """Quantus' ``PointingGame`` counts a hit when a pixel at the map's maximum lies in the mask; with one maximum
    per map (continuous random maps) that is our pointing game. Ours breaks ties by the first maximum in row-major
    order and scores a constant map as a miss (Quantus: a hit whenever the mask is not empty)."""
    quantus = _quantus()
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(64, 12, 10, generator=g)
    masks = torch.rand(64, 12, 10, generator=g) > 0.7
    masks[0] = False
    masks[0, 3, 4] = True
    maps[0, 3, 4] = 2.0  # one sure hit
    metric = quantus.PointingGame(disable_warnings=True)
    theirs = np.asarray(metric.evaluate_batch(a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy()),
                        dtype=float)
    ours = pointing(maps, masks).numpy()
    assert theirs[0] == 1.0 and 0 < theirs.mean() < 1
    assert np.array_equal(ours, theirs)


def test_with_async_logging_the_gradient_methods_maps_are_made_on_the_worker(tmp_path, monkeypatch):
    """The gradient methods' maps need only the probe pass's detached activations and gradients: with
    asynchronous logging they are computed on the worker, so the training thread runs the probe pass and takes
    the model's copy only. A method that runs the model (Score-CAM) keeps the maps on the training thread."""
    import threading

    from cnnvis_tb.kinds.gradcam import GradCam

    where = []
    original = GradCam._maps
    monkeypatch.setattr(GradCam, "_maps", lambda self, ctx: (where.append(threading.current_thread().name),
                                                            original(self, ctx))[1])
    probe, labels = make_batch(12, n=3)
    for methods, expected in ((["gradcam", "gradcam++"], "cnnvis-log"),
                              (["gradcam", "scorecam"], threading.current_thread().name)):
        where.clear()
        with VisLogger(TinyCNN().eval(), tmp_path / methods[1], probe=probe, probe_labels=labels, strict=True,
                       kinds=["gradcam"], cam_methods=methods, layers={"gradcam": ["body"]}) as vis:
            vis.step(0)
        assert where == [expected]
        assert read_events(tmp_path / methods[1]).Scalars("cnnvis/metrics/gradcam/body/deletion/gradcam/pred")
