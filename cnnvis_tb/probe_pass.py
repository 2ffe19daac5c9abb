"""The one forward pass over the probe that every due kind of a logging step shares.

One forward with the union of the due kinds' hooks, then one ``torch.autograd.grad`` per distinct target set
(the true class and the predicted class of each probe image; when every prediction is right they are one set)
with respect to every layer output and input that some kind asked gradients for. Gradients never reach the
parameters' ``.grad``. The caller runs this inside :func:`cnnvis_tb.safety.preserved`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnvis_tb.hooks import OWN, capture
from cnnvis_tb.kinds.base import Needs
from cnnvis_tb.layers import select_output

__all__ = ["ProbePass", "run_probe_pass", "TARGETS"]

#: Target sets, in the order pictures show them: each image's true class (when labels are known), its prediction.
TARGETS = ("true", "pred")


@dataclass
class ProbePass:
    """What the shared pass produced.

    Attributes:
        scores: ``[N, classes]`` class scores (in the graph when gradients were taken).
        inputs: the probe as fed (requires grad when input gradients were asked for).
        targets: ``{"true": [N], "pred": [N]}`` class per image ("true" only with probe labels).
        activations: ``{layer: [N, ...]}`` detached copies of layer outputs.
        graph_activations: ``{layer: [N, ...]}`` layer outputs in the autograd graph, as the network consumed them.
        own_activations: ``{"<layer>:own": [N, ...]}`` layer outputs in the graph as the layers produced them.
        grads: ``{target: {layer, "<layer>:own" or "input": gradient}}``; a layer the scores do not depend on maps
            to None.
    """

    scores: torch.Tensor
    inputs: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    graph_activations: dict[str, torch.Tensor] = field(default_factory=dict)
    own_activations: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def probabilities(self) -> torch.Tensor:
        """Softmax of the scores ``[N, classes]``, float32, on the CPU."""
        return self.scores.detach().float().softmax(dim=1).cpu()


def _modules(net: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The named layers still in the model (a removed layer is reported by the kind that wanted it)."""
    modules = dict(net.named_modules())
    return {n: modules[n] for n in names if n in modules}


def run_probe_pass(
    net: nn.Module,
    inputs: torch.Tensor,
    needs: Needs,
    labels: torch.Tensor | None = None,
    output_selector: Callable[[object], torch.Tensor] | None = None,
) -> ProbePass:
    """One forward over ``inputs`` serving ``needs`` (the union of the due kinds' needs), then the gradients."""
    x = inputs.detach()
    if needs.input_gradients:
        x = x.clone().requires_grad_(True)
    with contextlib.ExitStack() as stack:
        hooked = _modules(net, needs.graph_activations + needs.own_gradients)
        graph_acts = stack.enter_context(capture(hooked, for_grad=True, own=frozenset(needs.own_gradients))) if (
            hooked) else {}
        acts = stack.enter_context(capture(_modules(net, needs.activations))) if needs.activations else {}
        with torch.set_grad_enabled(needs.gradients):
            scores = select_output(net(x), output_selector)
    pred = scores.detach().argmax(dim=1)
    targets = {"true": labels.to(pred.device)} if labels is not None else {}
    targets["pred"] = pred
    record = ProbePass(scores=scores, inputs=x, targets=targets, activations=dict(acts),
                       graph_activations={n: t for n, t in graph_acts.items() if n in needs.graph_activations})
    record.own_activations = {n + OWN: graph_acts[n + OWN] for n in needs.own_gradients if n + OWN in graph_acts}
    if needs.gradients:
        _gradients(record, needs)
    return record


def _gradients(record: ProbePass, needs: Needs) -> None:
    """Gradients of each target's scores w.r.t. the graph activations (and the input), one backward per
    distinct target set: when every prediction is right, 'true' reuses the 'pred' gradients."""
    names = [n for n in needs.graph_activations if n in record.graph_activations]
    inputs = [record.graph_activations[n] for n in names]
    names += list(record.own_activations)
    inputs += list(record.own_activations.values())
    if needs.input_gradients:
        names.append("input")
        inputs.append(record.inputs)
    if not inputs:  # every layer asked for has left the model: the kinds that wanted them say so themselves
        return
    keys = list(record.targets)
    for i, key in enumerate(keys):
        t = record.targets[key]
        same = next((k for k in keys[:i] if torch.equal(record.targets[k], t)), None)
        if same is not None:
            record.grads[key] = record.grads[same]
            continue
        last = all(torch.equal(record.targets[k], t) for k in keys[i + 1 :])
        score = record.scores.gather(1, t[:, None]).sum()
        grads = torch.autograd.grad(score, inputs, retain_graph=not last, allow_unused=True)
        record.grads[key] = dict(zip(names, grads, strict=True))
