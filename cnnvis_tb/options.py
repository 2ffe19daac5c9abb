"""The checks of VisLogger's options that need no model, shared by VisLogger and the Lightning callback
(which runs them in its constructor, long before the model exists)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cnnvis_tb.kinds.actmax import DEFAULT_STEPS
from cnnvis_tb.kinds.base import Kind, positive_int
from cnnvis_tb.probe import Probe, check_annotations, load_probe
from cnnvis_tb.schedule import apply_every, resolve_kinds

__all__ = ["CheckedOptions", "check_options", "check_async"]


def _norm(values, name: str, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values))
    if len(values) != channels:
        raise ValueError(f"{name} must have one value per input channel: expected {channels}, got {len(values)}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError(f"std values must be > 0, got {values}")
    return values


@dataclass(frozen=True)
class CheckedOptions:
    """Validated, model-independent options."""

    probe: Probe
    kinds: list[Kind]  # built, with their intervals set; not yet set up against the model
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: list[str] | None
    graph: bool = False
    async_logging: bool = False
    max_pending: int = 1


def check_options(
    *,
    probe: object,
    probe_labels: Sequence[int] | torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    every: int | Mapping[str, int] | None = None,
    kinds: Iterable[str | Kind] | None = None,
    probe_size: int = 8,
    top_k: int = 8,
    max_kernels: int = 64,
    actmax_steps: int = DEFAULT_STEPS,
    actmax_channels: int | Mapping[str, Sequence[int]] = 8,
    output_selector: Callable[[object], torch.Tensor] | None = None,
    saliency_methods: str | Iterable[str] = "vanilla",
    actmax_background: bool = False,
    actmax_diversity: int = 1,
    cam_methods: str | Iterable[str] = ("gradcam", "gradcam++"),
    cam_batch_size: int = 64,
    cam_scale: str = "image",
    cam_metrics: bool | str = True,
    probe_boxes: object = None,
    probe_masks: object = None,
    graph: bool = False,
    async_logging: bool = False,
    max_pending: int = 1,
) -> CheckedOptions:
    """Check every option that does not depend on the model; raise with what was expected and what was given."""
    kind_options = dict(top_k=top_k, max_kernels=max_kernels, actmax_steps=actmax_steps,
                        actmax_channels=actmax_channels, actmax_background=actmax_background,
                        actmax_diversity=actmax_diversity,
                        saliency_methods=saliency_methods, cam_methods=cam_methods, cam_batch_size=cam_batch_size,
                        cam_scale=cam_scale, cam_metrics=cam_metrics)
    checked_kinds = resolve_kinds(kinds, kind_options)
    apply_every(every, checked_kinds)
    positive_int("probe_size", probe_size)
    check_async(async_logging, max_pending)
    if not isinstance(graph, bool):
        raise TypeError(f"graph must be True or False (log the model's graph once, for TensorBoard's Graphs tab), "
                        f"got {graph!r}")
    if output_selector is not None and not callable(output_selector):
        raise TypeError(f"output_selector must be callable (output -> scores [N, classes]), got {output_selector!r}")
    if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)):
        raise TypeError(f"class_names must be a sequence of names, one per class, got {type(class_names).__name__}")
    checked_probe = check_annotations(load_probe(probe, probe_labels, max_images=probe_size), probe_boxes,
                                      probe_masks)
    channels = checked_probe.images.shape[1]
    return CheckedOptions(
        probe=checked_probe,
        kinds=checked_kinds,
        mean=_norm(mean, "mean", channels),
        std=_norm(std, "std", channels),
        class_names=None if class_names is None else [str(c) for c in class_names],
        graph=graph,
        async_logging=async_logging,
        max_pending=max_pending,
    )


def check_async(async_logging: object, max_pending: object) -> None:
    """``async_logging`` must be a bool and ``max_pending`` a positive int (logging steps in flight)."""
    if not isinstance(async_logging, bool):
        raise TypeError("async_logging must be True (the training thread runs the model work of a logging step, a "
                        "worker thread renders and writes) or False (everything on the training thread), got "
                        f"{async_logging!r}")
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError("max_pending must be a positive int (logging steps whose rendering and writing may still "
                         f"run on the worker when the next one starts), got {max_pending!r}")
