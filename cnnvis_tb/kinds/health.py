"""Training health as scalars over the steps: dead channels, activation statistics, weight and gradient norms, the
update ratio, and how the probe itself is classified. No annotations needed; everything under
``cnnvis/metrics/health/<layer>/<metric>`` through ``add_scalar``, so the Scalars tab and tbparse read it too.

Per activation layer (default: three activation modules, ``nn.ReLU`` and the like, spread over depth; models with
functional activations get three convolutions):

* ``dead_fraction``: the share of channels that are never positive on any probe image at any position;
* ``act_mean``, ``act_std``: mean and standard deviation of the layer's output over the probe.

Per weight layer (the convolutions spread over depth, as the kernels kind chooses them):

* ``weight_norm``: ``‖W‖`` (Frobenius);
* ``grad_norm``: ``‖dL/dW‖`` of the user's own ``.grad`` when it exists at the logging step (read, never written);
* ``update_ratio``: ``‖W_t - W_prev‖ / ‖W_prev‖`` between two consecutive logging steps of this kind (a common rule
  of thumb wants about 1e-3 per *training* step; divide by the interval to compare). The kind keeps one copy of those
  layers' weights (their size is in the run's kinds table), nothing of the rest of the model.

For the probe (with ``probe_labels``): ``probe/accuracy`` and ``probe/true_probability`` (mean softmax
probability of the true class), and that probability per image, ``probe/true_probability/probe_<i>``.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnvis_tb import tags
from cnnvis_tb.kinds.base import Kind, ModelInfo, Needs, Output, StepContext

__all__ = ["Health", "ACTIVATIONS"]

#: Module types counted as activations for the automatic layer choice.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.PReLU)


def _spread(names: list[str], count: int) -> list[str]:
    if len(names) <= count:
        return names
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


class Health(Kind):
    """The ``health`` kind (scalars only, see the module docs)."""

    name, label, every = "health", "Training health", 100
    log_in_background = True  # compute reads the parameters; log only the probe pass's detached copies

    def default_layers(self, info: ModelInfo) -> list[str]:
        modules = dict(info.net.named_modules())
        ran = sorted((t for t in info.traces if t.order >= 0 and t.output_shape is not None
                      and len(t.output_shape) == 4 and isinstance(modules.get(t.name), ACTIVATIONS)),
                     key=lambda t: t.order)
        return _spread([t.name for t in ran], 3) or info.spread_layers(3)

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        self.weight_layers = info.spread_layers(3)
        self._previous: dict[str, torch.Tensor] = {}

    def details(self) -> str:
        modules = dict(self.info.net.named_modules()) if self.info else {}
        numbers = sum(modules[n].weight.numel() for n in self.weight_layers if n in modules)
        return super().details() + f"; weights of {', '.join(self.weight_layers)} ({numbers:,} numbers kept)"

    def needs(self) -> Needs:
        return Needs(activations=tuple(self.layers), scores=True)

    @torch.no_grad()
    def compute(self, ctx: StepContext) -> tuple[list[str], dict[str, dict[str, float]]]:
        """What needs the parameters, read now (the next optimizer step changes them in place): the activation
        layers still in the model and, per weight layer, ``weight_norm``, ``grad_norm`` and ``update_ratio``."""
        present = self.present_layers(ctx.net)
        modules = dict(ctx.net.named_modules())
        weights: dict[str, dict[str, float]] = {}
        for layer in self.weight_layers:
            weight = getattr(modules.get(layer), "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            w = weight.detach()
            values = weights[layer] = {"weight_norm": w.float().norm().item()}
            if weight.grad is not None:
                values["grad_norm"] = weight.grad.detach().float().norm().item()
            before = self._previous.get(layer)
            if before is not None and before.shape == w.shape:
                values["update_ratio"] = ((w.float() - before.float()).norm()
                                          / before.float().norm().clamp_min(1e-12)).item()
            self._previous[layer] = w.clone()
        return present, weights

    def log(self, ctx: StepContext, out: Output, computed) -> None:
        shared = ctx.shared
        present, weights = computed
        for layer in self.each_present(present):
            acts = shared.activations.get(layer)
            if acts is None:
                raise RuntimeError(f"layer {layer!r} did not run in the forward pass")
            a = acts.detach().float()
            if a.dim() >= 2:
                per_channel = a.transpose(0, 1).reshape(a.shape[1], -1)
                out.scalar(layer, "dead_fraction", (per_channel.amax(dim=1) <= 0).float().mean().item())
            out.scalar(layer, "act_mean", a.mean().item())
            out.scalar(layer, "act_std", a.std().item() if a.numel() > 1 else 0.0)
        for layer, values in weights.items():
            for metric, value in values.items():
                out.scalar(layer, metric, value)
        if "true" in shared.targets:
            true = shared.targets["true"].cpu()
            probs = shared.probabilities
            out.scalar("probe", "accuracy", (shared.targets["pred"].cpu() == true).float().mean().item())
            per_image = probs.gather(1, true[:, None])[:, 0]
            out.scalar("probe", "true_probability", per_image.mean().item())
            for i, p in enumerate(per_image.tolist()):  # which images it learns, and since when
                out.scalar("probe", f"true_probability/{tags.probe_view(i)}", p)
