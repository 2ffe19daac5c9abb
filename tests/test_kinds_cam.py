"""The CAM family against the anchors (pytorch-grad-cam, torch-cam) and references written here."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import TinyCNN, hook_counts, make_batch
from torch import nn

from cnnvis_tb import cam
from cnnvis_tb.demo import SmallCNN
from cnnvis_tb.kinds.cam_methods import METHODS

try:
    import pytorch_grad_cam as pgc
    import torchcam.methods as tcm
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError:  # pragma: no cover - installed by .[test]
    pgc = tcm = None
    if os.environ.get("CI") == "true":
        raise

needs_anchors = pytest.mark.skipif(pgc is None, reason="grad-cam / torchcam not installed (pip install -e '.[test]')")

PGC = {"gradcam": "GradCAM", "xgradcam": "XGradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM",
       "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "fullgrad": "FullGrad"}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; two constant maps agree when both are constant."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 1.0 if (a.std() < 1e-9 and b.std() < 1e-9) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def cases():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    demo = SmallCNN().eval()
    return {
        "resnet18": (resnet, "layer4", torch.randn(4, 3, 64, 64), torch.tensor([1, 4, 7, 9])),
        "demo": (demo, "features", torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 0])),
    }


def _anchor(model, layer, x, targets, method):
    # the copy must own the hooked layer: build the extractor on one copy
    twin = copy.deepcopy(model)
    cls = getattr(pgc, PGC[method])
    layers = [] if method == "fullgrad" else [dict(twin.named_modules())[layer]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = cls(model=twin, target_layers=layers)
        try:
            return extractor(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            extractor.activations_and_grads.release()


@needs_anchors
@pytest.mark.parametrize("case", ["resnet18", "demo"])
@pytest.mark.parametrize("method", list(PGC))
def test_every_method_agrees_with_pytorch_grad_cam(cases, case, method):
    model, layer, x, targets = cases[case]
    if method == "scorecam" and case == "resnet18":  # 512 masked forwards per image: one image keeps this fast
        x, targets = x[:1], targets[:1]
    ours = cam(model, x, layer, targets, method, batch_size=32).numpy()
    theirs = _anchor(model, layer, x, targets, method)
    corr = [_corr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(corr) >= 0.99, (method, corr)


def _reference(acts: torch.Tensor, grads: torch.Tensor, method: str, flip: bool = False) -> torch.Tensor:
    """Written out from the papers, per image, with loops over channels (slow, plain)."""
    n, k = acts.shape[:2]
    out = []
    for i in range(n):
        a, g = acts[i].double(), grads[i].double()
        if method == "gradcam++":
            num, den = g**2, 2 * g**2 + a.sum(dim=(1, 2), keepdim=True) * g**3
            alpha = torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
            w = (alpha * g.clamp_min(0)).sum(dim=(1, 2))
            m = sum(w[c] * a[c] for c in range(k))
        else:  # eigencam / eigengradcam
            x = a if method == "eigencam" else a * g
            rows = x.flatten(1).T  # [hw, K]
            centred = rows - rows.mean(0)
            _, _, vt = np.linalg.svd(centred.numpy(), full_matrices=False)
            proj = centred @ torch.from_numpy(vt[0])
            total = rows.sum(1)
            if (((proj - proj.mean()) * (total - total.mean())).sum() < 0) != flip:  # our sign rule (or not)
                proj = -proj
            m = proj.view(x.shape[1:])
        out.append(m.clamp_min(0).float())
    return torch.stack(out)


def _acts_and_grads(model, layer, x, targets):
    """The layer's output and the gradient of the targets' scores (class indices, or a callable of the output)."""
    saved = {}
    twin = copy.deepcopy(model).eval()

    def hook(_m, _i, o):
        o = o.clone()
        o.retain_grad()
        saved["a"] = o
        return o

    dict(twin.named_modules())[layer].register_forward_hook(hook)
    out = twin(x)
    (targets(out) if callable(targets) else out.gather(1, targets[:, None])).sum().backward()
    return saved["a"].detach(), saved["a"].grad.detach()


def _upsample_scale(maps: torch.Tensor, size) -> torch.Tensor:
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi - lo > 1e-7, (maps - lo) / (hi - lo).clamp_min(1e-7), torch.zeros_like(maps))


@pytest.mark.parametrize("case", ["resnet18", "demo"])
@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "eigengradcam"])
def test_methods_where_the_anchors_differ_follow_the_paper(cases, case, method):
    model, layer, x, targets = cases[case]
    acts, grads = _acts_and_grads(model, layer, x, targets)
    expected = _upsample_scale(_reference(acts, grads, method), x.shape[-2:])
    ours = cam(model, x, layer, targets, method)
    corr = [_corr(a.numpy(), b.numpy()) for a, b in zip(ours, expected, strict=True)]
    assert min(corr) >= 0.999, corr


@needs_anchors
@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "eigengradcam"])
def test_the_anchors_agree_up_to_their_eps_or_svd_sign(cases, method):
    model, layer, x, targets = cases["demo"]
    ours = cam(model, x, layer, targets, method).numpy()
    name = {"gradcam++": "GradCAMPlusPlus", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM"}[method]
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = getattr(pgc, name)(model=twin, target_layers=[dict(twin.named_modules())[layer]])
        theirs = extractor(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        extractor.activations_and_grads.release()
    if method == "gradcam++":  # pytorch-grad-cam adds 1e-6 to the denominator
        assert min(_corr(a, b) for a, b in zip(ours, theirs, strict=True)) >= 0.98
        return
    acts, grads = _acts_and_grads(model, layer, x, targets)
    flipped = _upsample_scale(_reference(acts, grads, method, flip=True), x.shape[-2:]).numpy()
    for a, f, b in zip(ours, flipped, theirs, strict=True):  # LAPACK's sign is ours, or the other one
        assert max(_corr(a, b), _corr(f, b)) >= 0.99


@needs_anchors
@pytest.mark.parametrize("method", ["cam", "gradcam", "xgradcam", "layercam", "scorecam"])
def test_torch_cam_agrees(cases, method):
    model, layer, x, targets = cases["resnet18"]
    if method == "scorecam":  # 512 masked forwards per image: one image keeps this fast
        x, targets = x[:1], targets[:1]
    twin = copy.deepcopy(model)
    name = {"cam": "CAM", "gradcam": "GradCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
            "scorecam": "ScoreCAM"}[method]
    kwargs = {"fc_layer": "fc"} if method == "cam" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = getattr(tcm, name)(twin, target_layer=layer, **kwargs)
        with torch.set_grad_enabled(method not in ("cam", "scorecam")):
            scores = twin(x)
        (maps,) = extractor(targets.tolist(), scores, normalized=False)
        extractor.remove_hooks()
    # torch-cam leaves CAM's map un-rectified; we (as pytorch-grad-cam) apply the ReLU to every method's map
    theirs = F.interpolate(maps[:, None].float().relu(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    ours = cam(model, x, layer, targets, method)
    corr = [_corr(a.numpy(), b.detach().numpy()) for a, b in zip(ours, theirs, strict=True)]
    assert min(corr) >= 0.99, corr


def test_callable_and_int_and_predicted_targets(cases):
    model, layer, x, _ = cases["demo"]
    summed = cam(model, x, layer, lambda out: out[:, 1] + out[:, 3], "gradcam")
    acts, grads = _acts_and_grads(model, layer, x, lambda out: out[:, 1] + out[:, 3])
    expected = _upsample_scale(torch.einsum("nk,nkhw->nhw", grads.mean(dim=(2, 3)), acts).clamp_min(0),
                               x.shape[-2:])
    assert torch.allclose(summed, expected, atol=1e-5)
    pred = model(x).argmax(1)
    assert torch.allclose(cam(model, x, layer, None), cam(model, x, layer, pred))
    assert torch.allclose(cam(model, x, layer, 2), cam(model, x, layer, [2, 2, 2, 2]))
    with pytest.raises(ValueError, match=r"expected shape \(4,\), got \(4, 4\)"):
        cam(model, x, layer, lambda out: out, "gradcam")
    with pytest.raises(ValueError, match="give class targets"):
        cam(model, x, layer, lambda out: out[:, 0], "cam")


def test_bad_input():
    model = TinyCNN()
    x, _ = make_batch(0, n=2)
    with pytest.raises(ValueError, match=r"unknown CAM method 'scorcam' \(did you mean 'scorecam'"):
        cam(model, x, "body", method="scorcam")

    class NoGap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(4 * 16 * 16, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    with pytest.raises(ValueError, match=r"CAM needs global average pooling .*Use method='gradcam'"):
        cam(NoGap(), x, "conv", method="cam")


class SkipAfter(nn.Module):
    """A skip connection from the stem to after the CAM layer: the network after the layer mixes a tensor from
    before it, so Ablation-CAM must not run the ablated copies after the layer alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.fc((self.block(s) + s).mean(dim=(2, 3)))


def _ablation_reference(model, x, layer, targets):
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        base = model(x).gather(1, targets[:, None])[:, 0]
        acts = {}
        h = module.register_forward_hook(lambda m, i, o: acts.update(a=o.clone()))
        model(x)
        h.remove()
        k = acts["a"].shape[1]
        weights = torch.empty(len(x), k)
        for c in range(k):
            def ablate(m, i, o, c=c):
                o = o.clone()
                o[:, c] = 0
                return o

            h = module.register_forward_hook(ablate)
            weights[:, c] = (base - model(x).gather(1, targets[:, None])[:, 0]) / base
            h.remove()
    maps = torch.einsum("nk,nkhw->nhw", weights, acts["a"]).clamp_min(0)
    return _upsample_scale(maps, x.shape[-2:])


@pytest.mark.parametrize("model_and_layer", ["skip", "tiny"])
def test_ablation_cam_equals_whole_forwards_also_when_the_fast_path_is_unsound(model_and_layer):
    model, layer = (SkipAfter().eval(), "block") if model_and_layer == "skip" else (TinyCNN().eval(), "body")
    x, _ = make_batch(9, n=2)
    targets = torch.tensor([0, 2])
    ours = cam(model, x, layer, targets, "ablationcam", batch_size=4)
    assert torch.allclose(ours, _ablation_reference(model, x, layer, targets), atol=1e-4)


def test_ablation_cam_runs_the_network_before_the_layer_far_fewer_times(cases):
    model, layer, x, targets = cases["resnet18"]
    counts = {"before": 0, "after": 0}
    twin = copy.deepcopy(model)
    twin.conv1.register_forward_pre_hook(lambda *a: counts.__setitem__("before", counts["before"] + 1))
    twin.fc.register_forward_pre_hook(lambda *a, **k: counts.__setitem__("after", counts["after"] + 1))
    cam(twin, x, layer, targets, "ablationcam", batch_size=128)
    # 4 images x 512 channels: 16 chunks of 128 copies (+ 1 check copy); the layers before layer4 run once per chunk
    assert counts["before"] <= 1 + 4 * 4 + 1 and counts["after"] == counts["before"]


def test_score_cam_shares_one_forward_for_constant_channels():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 3)
            with torch.no_grad():
                self.conv.weight[4:] = 0
                self.conv.bias[4:] = -1.0  # channels 4..7 are 0 after the ReLU everywhere

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))

    model = Dead().eval()
    x, _ = make_batch(3, n=2)
    calls = []
    model.conv.register_forward_pre_hook(lambda *a: calls.append(a[1][0].shape[0]))
    maps = cam(model, x, "relu", [0, 1], "scorecam", batch_size=64)
    # one forward of the probe, one for all constant masks, one for the 2 x 4 live masks
    assert len(calls) == 3 and sorted(calls) == [1, 2, 8]
    if pgc is not None:
        assert min(_corr(a, b) for a, b in zip(maps.numpy(), _anchor(model, "relu", x, [0, 1], "scorecam"),
                                               strict=True)) >= 0.99


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_the_model_as_it_was(method):
    torch.manual_seed(1)
    model = TinyCNN().train()
    x, y = make_batch(4, n=2)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags, hooks, rng = {n: m.training for n, m in model.named_modules()}, hook_counts(model), torch.get_rng_state()
    for context in (torch.no_grad, torch.inference_mode):
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            maps = cam(model, x, "body", [0, 1], method, batch_size=8)
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and maps.shape == (2, 16, 16)
    assert {n: m.training for n, m in model.named_modules()} == flags and hook_counts(model) == hooks
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert torch.equal(rng, torch.get_rng_state())


@needs_anchors
def test_densenet_uses_the_activation_as_the_network_consumes_it():
    """DenseNet's forward runs ``F.relu(features, inplace=True)``, then global pooling and the classifier: Grad-CAM of
    the rectified map the classifier consumes equals CAM, and torch-cam's Grad-CAM. pytorch-grad-cam pairs that
    rectified activation with the gradient of the layer's own output (before the ReLU: its tensor hook sits there),
    i.e. weights ``mean_ij(g * [A > 0])``; seed 1 is one where that differs from Grad-CAM by more than 0.01 in
    correlation (seeds 1, 3, 5 of 0..5 do), so its Grad-CAM is checked against that reference instead."""
    torch.manual_seed(1)
    model = torchvision.models.densenet121(weights=None, num_classes=5).eval()
    x, targets = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    ours = {m: cam(model, x, "features", targets, m).numpy() for m in ("gradcam", "cam", "xgradcam", "layercam")}

    def agree(a, b, at_least=0.999):
        corr = [_corr(p, q) for p, q in zip(a, b, strict=True)]
        assert min(corr) >= at_least, corr

    agree(ours["gradcam"], ours["cam"])
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = tcm.GradCAM(twin, target_layer="features")
        (maps,) = extractor(targets.tolist(), twin(x), normalized=False)
        extractor.remove_hooks()
    agree(ours["gradcam"], _upsample_scale(maps.detach().float().relu(), x.shape[-2:]).numpy())
    for method in ("xgradcam", "layercam"):  # g * A elementwise: where the ReLU is off, A is 0 either way
        agree(ours[method], _anchor(model, "features", x, targets, method), 0.99)

    with torch.no_grad():
        own = model.features(x)
    own.requires_grad_(True)
    rectified = F.relu(own)
    scores = model.classifier(F.adaptive_avg_pool2d(rectified, 1).flatten(1)).gather(1, targets[:, None]).sum()
    g_rectified, g_own = torch.autograd.grad(scores, [rectified, own])
    textbook = torch.einsum("nk,nkhw->nhw", g_rectified.mean(dim=(2, 3)), rectified.detach()).clamp_min(0)
    hybrid = torch.einsum("nk,nkhw->nhw", g_own.mean(dim=(2, 3)), rectified.detach()).clamp_min(0)
    agree(ours["gradcam"], _upsample_scale(textbook, x.shape[-2:]).numpy())
    agree(_anchor(model, "features", x, targets, "gradcam"), _upsample_scale(hybrid, x.shape[-2:]).numpy())


def _with_trained_statistics(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm biases and running statistics away from their initial 0 / 1, as after training: with the initial
    ones every folded bias is 0 and FullGrad's bias terms vanish."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                k = m.num_features
                m.running_mean.copy_(torch.randn(k, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(k, generator=g) + 0.5)
                m.bias.copy_(torch.randn(k, generator=g) * 0.3)
    return model.eval()


@needs_anchors
@pytest.mark.parametrize("case", ["resnet18", "demo"])
def test_fullgrad_with_nonzero_biases(cases, case):
    """FullGrad's bias term is ``|b * d score / d(the bias layer's output)|``: the gradient of the layer's own output,
    before the in-place ReLU (or ``+=``) that follows it. A model's maths, hence its FullGrad, does not depend on
    ``ReLU(inplace=True)`` vs ``ReLU()``."""
    model, layer, x, targets = cases[case]
    model = _with_trained_statistics(copy.deepcopy(model), 3)
    ours = cam(model, x, layer, targets, "fullgrad")
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    assert torch.allclose(ours, cam(out_of_place, x, layer, targets, "fullgrad"), atol=1e-4)
    corr = [_corr(a, b) for a, b in zip(ours.numpy(), _anchor(model, layer, x, targets, "fullgrad"), strict=True)]
    assert min(corr) >= 0.99, corr


@pytest.mark.parametrize("method", list(METHODS))
def test_images_made_in_inference_mode(method):
    """A user's evaluation loop hands over tensors made under ``torch.inference_mode()``."""
    torch.manual_seed(1)
    model = TinyCNN().eval()
    x, _ = make_batch(4, n=2)
    expected = cam(model, x, "body", [0, 1], method, batch_size=8)
    with torch.inference_mode():
        images = x.clone()
        maps = cam(model, images, "body", [0, 1], method, batch_size=8)
    assert torch.allclose(maps, expected, atol=1e-6)


@pytest.mark.parametrize("frozen", ["backbone", "everything"])
@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_parameters(method, frozen):
    """Fine-tuning with a frozen backbone (or a fully frozen model): the layer's output needs no grad of its own."""
    torch.manual_seed(1)
    model = TinyCNN().eval()
    x, _ = make_batch(4, n=2)
    expected = cam(model, x, "body", [0, 1], method, batch_size=8)
    params = list(model.stem.parameters()) + list(model.body.parameters()) if frozen == "backbone" else list(
        model.parameters())
    for p in params:
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    maps = cam(model, x, "body", [0, 1], method, batch_size=8)
    assert torch.allclose(maps, expected, atol=1e-6)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


class _PerImage:
    """pytorch-grad-cam's target: a callable of one image's output."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, output):
        return self.fn(output[None])[0]


@needs_anchors
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
@pytest.mark.parametrize("output", ["sum of classes", "regression"])
def test_callable_targets_agree_with_pytorch_grad_cam(cases, method, output):
    model, layer, x, _ = cases["demo"]
    if output == "regression":  # one output per image, [N, 1]: the callable may return it as is
        torch.manual_seed(4)
        model, score = SmallCNN(num_classes=1).eval(), (lambda out: out)
    else:
        score = lambda out: out[:, 1] + out[:, 3]  # noqa: E731
    ours = cam(model, x, layer, score, method, batch_size=64).numpy()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = getattr(pgc, PGC[method])(model=twin, target_layers=[dict(twin.named_modules())[layer]])
        theirs = extractor(input_tensor=x, targets=[_PerImage(lambda o: score(o).reshape(len(o)))] * len(x))
        extractor.activations_and_grads.release()
    corr = [_corr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(corr) >= 0.99, corr


def _psd(values: torch.Tensor, seed: int) -> torch.Tensor:
    """Symmetric PSD matrices ``[N, d, d]`` with the given eigenvalues ``[N, d]`` and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(values.shape[0], values.shape[1], values.shape[1], generator=g,
                                       dtype=torch.float64))
    return (q * values[:, None, :].double()) @ q.transpose(1, 2)


@pytest.mark.parametrize("d", [4, 17, 64, 256, 300])
def test_leading_eigenvector_by_squaring_matches_eigh(d):
    from cnnvis_tb.kinds.cam_methods import _leading_eigenvectors

    values = torch.rand(6, d, generator=torch.Generator().manual_seed(d)) ** 3
    values[:, 0] = values.max(dim=1).values * torch.tensor([1.02, 1.05, 1.5, 3.0, 10.0, 100.0])  # gaps of 2 %...
    gram = _psd(values, seed=d)
    vectors, top = _leading_eigenvectors(gram.float())
    expected_values, expected = torch.linalg.eigh(gram)
    cosine = (vectors.double() * expected[:, :, -1]).sum(1).abs()
    assert torch.all(cosine > 1 - 1e-5), cosine
    torch.testing.assert_close(top.double(), expected_values[:, -1], rtol=1e-4, atol=0)


def test_leading_eigenvector_with_nearly_equal_eigenvalues_falls_back_to_eigh(monkeypatch):
    import cnnvis_tb.kinds.cam_methods as methods

    values = torch.linspace(0.01, 0.5, 64).repeat(2, 1)
    values[:, -2] = 0.5
    values[:, -1] = 0.5 * (1 + torch.tensor([1e-3, 0.5]))  # nearly tied leading pairs, and a clear one
    gram = _psd(values, seed=1).float()
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(methods.torch.linalg, "eigh", lambda m: calls.append(m.shape[0]) or eigh(m))
    vectors, _ = methods._leading_eigenvectors(gram)
    assert calls == [1]  # only the unconverged matrix was redone
    expected = eigh(gram.double())[1][:, :, -1]
    assert torch.all((vectors.double() * expected).sum(1).abs() > 1 - 1e-4)


def test_leading_eigenvector_of_a_clear_gap_stops_after_the_first_stage(monkeypatch):
    """λ2/λ1 <= 0.8 (as in the CAM layers measured): G^64 passes the check, so 6 squarings and one check, not 10."""
    import cnnvis_tb.kinds.cam_methods as methods

    values = torch.linspace(0.01, 0.4, 64).repeat(3, 1)
    values[:, -1] = 0.5
    gram = _psd(values, seed=2).float()
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(methods.torch, "bmm", lambda *a, **k: calls.append(1) or bmm(*a, **k))
    vectors, _ = methods._leading_eigenvectors(gram)
    assert len(calls) == methods._SQUARING_STAGES[0] + 1
    expected = torch.linalg.eigh(gram.double())[1][:, :, -1]
    assert torch.all((vectors.double() * expected).sum(1).abs() > 1 - 1e-5)


def test_eigencam_of_a_dead_layer_is_zero_not_nan():
    from cnnvis_tb.kinds.gradcam import cam_from_gradients

    maps = cam_from_gradients(torch.zeros(2, 64, 8, 8), torch.ones(2, 64, 8, 8), "eigengradcam")
    assert torch.equal(maps, torch.zeros(2, 8, 8))
