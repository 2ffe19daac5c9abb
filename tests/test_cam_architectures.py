"""The automatic CAM layer and every CAM method on torchvision's CNN families (weights=None, small inputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from _models import hook_counts

from cnnvis_tb import VisLogger, cam
from cnnvis_tb.kinds.cam_methods import METHODS

ARCHITECTURES = {
    "alexnet": lambda: tvm.alexnet(weights=None, num_classes=4),
    "vgg11": lambda: tvm.vgg11(weights=None, num_classes=4),
    "resnet18": lambda: tvm.resnet18(weights=None, num_classes=4),
    "resnext50_32x4d": lambda: tvm.resnext50_32x4d(weights=None, num_classes=4),
    "wide_resnet50_2": lambda: tvm.wide_resnet50_2(weights=None, num_classes=4),
    "densenet121": lambda: tvm.densenet121(weights=None, num_classes=4),
    "squeezenet1_1": lambda: tvm.squeezenet1_1(weights=None, num_classes=4),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(weights=None, num_classes=4),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(weights=None, num_classes=4),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(weights=None, num_classes=4),
    "regnet_x_400mf": lambda: tvm.regnet_x_400mf(weights=None, num_classes=4),
    "convnext_tiny": lambda: tvm.convnext_tiny(weights=None, num_classes=4),
    "shufflenet_v2_x0_5": lambda: tvm.shufflenet_v2_x0_5(weights=None, num_classes=4),
    "mnasnet0_5": lambda: tvm.mnasnet0_5(weights=None, num_classes=4),
    "googlenet": lambda: tvm.googlenet(weights=None, num_classes=4, aux_logits=False, init_weights=False),
    "inception_v3": lambda: tvm.inception_v3(weights=None, num_classes=4, aux_logits=False, init_weights=False),
}
#: Score-CAM runs one whole forward per channel: checked where the CAM layer has few channels, to keep this fast.
SCORECAM_ON = {"alexnet", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5", "resnet18", "vgg11"}
#: Models whose head is global average pooling + one linear layer (CAM applies).
GAP_LINEAR = {"resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "shufflenet_v2_x0_5", "googlenet",
              "inception_v3", "regnet_x_400mf", "mobilenet_v2", "efficientnet_b0", "mnasnet0_5"}
#: The automatic CAM layer: the last convolutional block whose output is still a spatial map.
EXPECTED_LAYER = {
    "alexnet": "features.10", "vgg11": "features", "resnet18": "layer4", "resnext50_32x4d": "layer4",
    "wide_resnet50_2": "layer4", "densenet121": "features", "squeezenet1_1": "classifier.1", "mobilenet_v2": "features",
    "mobilenet_v3_small": "features", "efficientnet_b0": "features", "regnet_x_400mf": "trunk_output",
    "convnext_tiny": "features", "shufflenet_v2_x0_5": "conv5", "mnasnet0_5": "layers", "googlenet": "inception5b",
    "inception_v3": "Mixed_7c",
}
#: Input side per model: Inception v3's last block keeps a spatial map (3x3) from 160 px on.
SIDE = {"inception_v3": 160}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_method_on_the_automatic_cam_layer(name, tmp_path):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().train()
    side = SIDE.get(name, 64)
    x = torch.randn(1, 3, side, side)
    flags, hooks = {n: m.training for n, m in model.named_modules()}, hook_counts(model)
    with VisLogger(model, tmp_path, probe=x, probe_labels=[1], kinds=["gradcam"], strict=True) as vis:
        layer = vis.layers["gradcam"][0]
        shape = vis.kind("gradcam").info.layer_shapes[layer]
        assert len(shape) == 4 and shape[2] * shape[3] > 1, (layer, shape)  # a spatial map before global pooling
        assert layer == EXPECTED_LAYER[name]
        vis.step(0)
    for method, spec in METHODS.items():
        if method == "scorecam" and name not in SCORECAM_ON:
            continue
        if spec.head and name not in GAP_LINEAR:
            with pytest.raises(ValueError, match="CAM needs global average pooling"):
                cam(model, x, layer, [1], method)
            continue
        maps = cam(model, x, layer, [1], method, batch_size=256)
        assert maps.shape == (1, *x.shape[-2:]) and torch.isfinite(maps).all(), method
        assert 0 <= float(maps.min()) and float(maps.max()) <= 1, method
    assert {n: m.training for n, m in model.named_modules()} == flags and hook_counts(model) == hooks
