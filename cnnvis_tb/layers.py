"""Layer discovery: unwrapping, naming, automatic choice of layers and the layer table."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_tb.hooks import first_tensor
from cnnvis_tb.safety import model_device, model_dtype, preserved

__all__ = [
    "unwrap_model",
    "resolve_layer",
    "conv_layers",
    "find_layers",
    "LayerTrace",
    "trace_layers",
    "default_cam_layer",
    "layer_table",
    "select_output",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that really computes: strips DataParallel / DistributedDataParallel and torch.compile wrappers.

    Hooks and forward passes go to this module, so a DDP reducer or a compiled graph is never triggered by us.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
    return model


def _is_conv2d(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and getattr(module, "weight", None) is not None and (
        module.weight.dim() == 4
    )


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All 2-D convolutions of ``model`` as ``(name, module)`` in definition order."""
    return [(name, m) for name, m in model.named_modules() if name and _is_conv2d(m)]


def resolve_layer(model: nn.Module, layer: str | nn.Module, *, need_conv: bool = False) -> tuple[str, nn.Module]:
    """Find a layer by its ``named_modules()`` name or by the module itself; return ``(name, module)``.

    Raises ``ValueError`` naming close matches when the name is unknown, and when ``need_conv`` is set and
    the layer is not a 2-D convolution.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        name = next((n for n, m in modules.items() if m is layer), None)
        module = layer
        if name is None:
            raise ValueError(
                f"layer {type(layer).__name__} is not a submodule of the model; pass a module of the model or its name"
            )
    elif isinstance(layer, str):
        name = layer
        if name not in modules or not name:
            candidates = [n for n in modules if n]
            close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else (
                f"known layers include {', '.join(repr(c) for c in candidates[:8])}"
                + (" ..." if len(candidates) > 8 else "")
            )
            raise ValueError(f"unknown layer {name!r}: {hint} (names come from model.named_modules())")
        module = modules[name]
    else:
        raise TypeError(f"layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")
    if need_conv and not _is_conv2d(module):
        convs = [n for n, _ in conv_layers(model)]
        close = difflib.get_close_matches(name, convs, n=3, cutoff=0.3) or convs[-3:]
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}, not a 2-D convolution; "
            f"kernel grids need a Conv2d, e.g. {', '.join(repr(c) for c in close)}"
        )
    return name, module


def find_layers(model: nn.Module, count: int = 3) -> list[str]:
    """Names of ``count`` convolutions spread evenly over the depth of ``model`` (first and last included)."""
    convs = [name for name, _ in conv_layers(unwrap_model(model))]
    if not convs:
        raise ValueError(
            f"{type(model).__name__} has no 2-D convolution (nn.Conv2d); cnnvis_tb visualizes convolutional networks"
        )
    if count >= len(convs):
        return convs
    if count == 1:
        return [convs[-1]]
    picks = sorted({round(i * (len(convs) - 1) / (count - 1)) for i in range(count)})
    return [convs[i] for i in picks]


def select_output(output: object, selector: Callable[[object], torch.Tensor] | None = None) -> torch.Tensor:
    """The class scores ``[N, num_classes]`` from a model's output (a tensor, tuple, list or dict).

    ``selector`` picks them explicitly; otherwise a tensor is used as is, a dict's ``"logits"`` / ``"out"``
    entry or a sequence's first tensor is taken.
    """
    if selector is not None:
        scores = selector(output)
    elif isinstance(output, torch.Tensor):
        scores = output
    elif isinstance(output, dict):
        key = next((k for k in ("logits", "out", "output", "scores") if k in output), None)
        scores = output[key] if key is not None else next(
            (v for v in output.values() if isinstance(v, torch.Tensor)), None
        )
    elif isinstance(output, (tuple, list)):
        scores = next((v for v in output if isinstance(v, torch.Tensor)), None)
    else:
        scores = None
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"could not find class scores [N, num_classes] in the model's output (got {shape}); "
            "pass output_selector=lambda out: out[...] to pick them"
        )
    return scores


@dataclass
class LayerTrace:
    """What one forward pass showed about each module: call order, output shape, parameter count."""

    name: str
    type_name: str
    output_shape: tuple[int, ...] | None
    params: int
    order: int  # position among completed forward calls (-1: never called)
    has_conv: bool


@torch.no_grad()
def trace_layers(model: nn.Module, images: torch.Tensor) -> tuple[list[LayerTrace], object]:
    """Run ``model(images)`` once with temporary hooks; report every named module and return the model's output.

    Hooks are removed afterwards.
    The caller is responsible for eval mode and state preservation (see ``cnnvis_tb.safety``).
    """
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    calls = iter(range(1 << 62))
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            t = first_tensor(output)
            shapes.setdefault(name, tuple(t.shape) if t is not None else None)
            # The completion order of the *last* call decides which block comes last.
            order[name] = next(calls)

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    try:
        for name, module in named:
            handles.append(module.register_forward_hook(make_hook(name)))
        output = model(images)
    finally:
        for h in handles:
            h.remove()
    traces = []
    for name, module in named:
        traces.append(
            LayerTrace(
                name=name,
                type_name=type(module).__name__,
                output_shape=shapes.get(name),
                params=sum(p.numel() for p in module.parameters()),
                order=order.get(name, -1),
                has_conv=any(_is_conv2d(m) for m in module.modules()),
            )
        )
    return traces, output


def default_cam_layer(traces: Iterable[LayerTrace]) -> str:
    """The last convolutional block before global pooling: the last module to finish whose output is a
    spatial map (``[N, C, H, W]`` with ``H * W > 1``) and that is or contains a convolution."""
    candidates = [
        t for t in traces
        if t.has_conv and t.output_shape is not None and len(t.output_shape) == 4
        and t.output_shape[2] * t.output_shape[3] > 1 and t.order >= 0
    ]
    if not candidates:
        raise ValueError(
            "found no convolutional layer with a spatial output [N, C, H, W] in the forward pass; "
            "name the Grad-CAM layer with layers={'gradcam': ['...']}"
        )
    return max(candidates, key=lambda t: t.order).name


def _cell(text: str) -> str:
    """A name as one Markdown table cell: ``|`` and backslashes escaped, so a name holding ``|`` keeps its row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|")


def layer_table(model: nn.Module, images: torch.Tensor | None = None, traces: list[LayerTrace] | None = None) -> str:
    """A Markdown table of the model's layers: name, type, output shape and parameter count.

    Pass ``images`` (``[N, C, H, W]``, as the model sees them) to fill the output shapes from one forward pass
    run in eval mode with the model's state restored afterwards, or ready-made ``traces``.
    """
    model = unwrap_model(model)
    if traces is None:
        if images is None:
            raise ValueError("layer_table needs images (a sample input [N, C, H, W]) or traces")
        with preserved(model):
            traces, _ = trace_layers(model, images.to(device=model_device(model), dtype=model_dtype(model)))
    rows = ["| layer | type | output shape | parameters |", "| --- | --- | --- | ---: |"]
    for t in traces:
        indent = "&nbsp;&nbsp;" * t.name.count(".")
        shape = "×".join(str(s) for s in t.output_shape) if t.output_shape else "–"
        rows.append(f"| {indent}{_cell(t.name)} | {_cell(t.type_name)} | {shape} | {t.params:,} |")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows.append(f"| **total** | {type(model).__name__} | | **{total:,}** ({trainable:,} trainable) |")
    return "\n".join(rows)
