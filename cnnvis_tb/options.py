"""The checks of VisLogger's options that need no model, shared by VisLogger and the Lightning callback
(which runs them in its constructor, long before the model exists)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cnnvis_tb.kinds.actmax import DEFAULT_STEPS
from cnnvis_tb.kinds.saliency import SALIENCY_METHODS
from cnnvis_tb.probe import Probe, load_probe
from cnnvis_tb.schedule import build_schedule, check_kinds

__all__ = ["CheckedOptions", "check_options", "check_saliency_methods", "positive_int"]


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _norm(values, name: str, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values))
    if len(values) != channels:
        raise ValueError(f"{name} must have one value per input channel: expected {channels}, got {len(values)}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError(f"std values must be > 0, got {values}")
    return values


def check_saliency_methods(methods: str | Iterable[str]) -> tuple[str, ...]:
    """One method name or several (in the given order, once each); unknown names raise with close matches."""
    if isinstance(methods, str):
        names = [methods]
    elif isinstance(methods, (set, frozenset)):  # no order of its own: the documented one
        names = sorted(methods, key=lambda m: (SALIENCY_METHODS.index(m) if m in SALIENCY_METHODS else -1, str(m)))
    elif isinstance(methods, Iterable):
        names = list(methods)
    else:
        raise TypeError(f"saliency_methods must be a method name or a list of them ({', '.join(SALIENCY_METHODS)}), "
                        f"got {methods!r}")
    if not names:
        raise ValueError(f"saliency_methods must name at least one of {', '.join(SALIENCY_METHODS)}")
    for name in names:
        if name not in SALIENCY_METHODS:
            close = difflib.get_close_matches(str(name), SALIENCY_METHODS, n=2, cutoff=0.4)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown saliency method {name!r}{hint}; expected some of {', '.join(SALIENCY_METHODS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class CheckedOptions:
    """Validated, model-independent options."""

    probe: Probe
    kinds: tuple[str, ...]
    schedule: tuple[tuple[str, int], ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: list[str] | None
    saliency_methods: tuple[str, ...]


def check_options(
    *,
    probe: object,
    probe_labels: Sequence[int] | torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    every: int | Mapping[str, int] | None = None,
    kinds: Iterable[str] | None = None,
    probe_size: int = 8,
    top_k: int = 8,
    max_kernels: int = 64,
    actmax_steps: int = DEFAULT_STEPS,
    actmax_channels: int | Mapping[str, Sequence[int]] = 8,
    output_selector: Callable[[object], torch.Tensor] | None = None,
    saliency_methods: str | Iterable[str] = "vanilla",
) -> CheckedOptions:
    """Check every option that does not depend on the model; raise with what was expected and what was given."""
    checked_kinds = check_kinds(kinds)
    schedule = build_schedule(every, checked_kinds)
    for name, value in (("probe_size", probe_size), ("top_k", top_k), ("max_kernels", max_kernels),
                        ("actmax_steps", actmax_steps)):
        positive_int(name, value)
    if not isinstance(actmax_channels, Mapping):
        positive_int("actmax_channels", actmax_channels)
    if output_selector is not None and not callable(output_selector):
        raise TypeError(f"output_selector must be callable (output -> scores [N, classes]), got {output_selector!r}")
    if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)):
        raise TypeError(f"class_names must be a sequence of names, one per class, got {type(class_names).__name__}")
    methods = check_saliency_methods(saliency_methods)
    checked_probe = load_probe(probe, probe_labels, max_images=probe_size)
    channels = checked_probe.images.shape[1]
    return CheckedOptions(
        probe=checked_probe,
        kinds=checked_kinds,
        schedule=schedule,
        mean=_norm(mean, "mean", channels),
        std=_norm(std, "std", channels),
        class_names=None if class_names is None else [str(c) for c in class_names],
        saliency_methods=methods,
    )
