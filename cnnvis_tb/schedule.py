"""Which kinds are logged, and when."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["ALL_KINDS", "DEFAULT_KINDS", "DEFAULT_EVERY", "NOT_AT_STEP_ZERO", "check_kinds", "build_schedule"]

#: Every kind the logger can compute (``summary`` is the layer table, written once).
ALL_KINDS = ("kernels", "features", "gradcam", "saliency", "actmax", "histograms")
#: Kinds logged when ``kinds`` is not given (saliency is opt-in).
DEFAULT_KINDS = ("kernels", "features", "gradcam", "actmax", "histograms")
#: Steps between two logs of each kind when ``every`` is not given: cheap kinds often, actmax rarely.
DEFAULT_EVERY = {"kernels": 100, "histograms": 100, "features": 200, "gradcam": 200, "saliency": 200, "actmax": 1000}
#: Kinds the schedule does not log at step 0 but first at their interval: activation maximization of the random
#: weights a run starts from shows no learned feature, and it is the costliest kind (``log_now`` still logs it).
NOT_AT_STEP_ZERO = frozenset({"actmax"})


def check_kinds(kinds: Iterable[str] | str | None, default: Iterable[str] = DEFAULT_KINDS) -> tuple[str, ...]:
    """Validate kind names (in the order of :data:`ALL_KINDS`); unknown names raise with close matches."""
    if kinds is None:
        return tuple(default)
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    for kind in kinds:
        if kind not in ALL_KINDS:
            close = difflib.get_close_matches(str(kind), ALL_KINDS, n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown kind {kind!r}{hint}; expected some of {ALL_KINDS}")
    return tuple(k for k in ALL_KINDS if k in kinds)


def _check_interval(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"every[{kind!r}] must be a positive int (steps between logs), got {value!r}")
    if value < 1:
        raise ValueError(f"every[{kind!r}] must be >= 1 (steps between logs), got {value}; leave a kind out of "
                         "`kinds` to turn it off")
    return value


def build_schedule(every: int | Mapping[str, int] | None, kinds: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """``((kind, interval), ...)`` for the enabled kinds.

    ``every`` is None (the defaults of :data:`DEFAULT_EVERY`), one int for every kind, or a mapping
    ``{kind: interval}`` overriding the defaults of the kinds it names.
    """
    if every is None or isinstance(every, Mapping):
        overrides = dict(every or {})
        for kind in overrides:
            check_kinds([kind])
        intervals = {k: _check_interval(k, overrides.get(k, DEFAULT_EVERY[k])) for k in kinds}
    else:
        value = every
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"every must be a positive int or a mapping {{kind: int}}, got {every!r}")
        intervals = {k: _check_interval(k, value) for k in kinds}
    return tuple((k, intervals[k]) for k in kinds)
