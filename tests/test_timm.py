"""timm's CNNs (pretrained=False, small inputs): sensible automatic layers, every kind logs in strict mode."""

from __future__ import annotations

import os

import pytest
import torch
from _models import hook_counts, read_events

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import ALL_KINDS

try:
    import timm
except ImportError:  # pragma: no cover - installed by .[test]
    timm = None
    if os.environ.get("CI") == "true":
        raise

MODELS = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002",
          "densenet121", "vgg11_bn", "cspdarknet53"]


@pytest.mark.skipif(timm is None, reason="timm is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("name", MODELS)
def test_every_kind_logs_on_a_timm_model(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    model.train()
    size = 64
    probe = torch.randn(2, 3, size, size)
    hooks, flags = hook_counts(model), {n: m.training for n, m in model.named_modules()}
    with VisLogger(model, tmp_path, probe=probe, probe_labels=[0, 2], kinds=ALL_KINDS, every=1, strict=True,
                   actmax_steps=2, actmax_channels=2, saliency_methods=("vanilla",)) as vis:
        cam_layer = vis.layers["gradcam"][0]
        shape = vis.kind("gradcam").info.layer_shapes[cam_layer]
        assert len(shape) == 4 and shape[2] * shape[3] > 1, (cam_layer, shape)  # the CAM layer keeps a spatial map
        vis.log_now(1)
    assert hook_counts(model) == hooks and {n: m.training for n, m in model.named_modules()} == flags
    families = {t.split("/")[1] for t in read_events(tmp_path).Tags()["images"]}
    assert families == {"gradcam", "features", "kernels", "actmax", "deepdream", "saliency"}
