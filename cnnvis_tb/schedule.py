"""Which kinds are logged, and when: kind names and ``Kind`` instances resolved, intervals applied."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cnnvis_tb.kinds import BUILTIN, DEFAULT_KINDS
from cnnvis_tb.kinds.base import Kind, check_every, check_kind_class, unknown_kind

__all__ = ["resolve_kinds", "apply_every", "due_kinds"]


def resolve_kinds(
    kinds: Iterable[str | Kind] | str | Kind | None, options: Mapping[str, Any] | None = None
) -> list[Kind]:
    """The kinds to log, as instances: built-in names are built from ``options`` (VisLogger's keyword options; every
    built-in kind is built, so its options are checked even when it is not logged), ``Kind`` instances are checked
    and kept. Built-in kinds come in the registry's order, a user's after them in
    the given order. Unknown names raise with close matches; two kinds with one name raise."""
    # Every built-in kind is built from the options, logged or not, so a bad option fails now whichever kinds run.
    built = {name: cls.from_options(options or {}) for name, cls in BUILTIN.items()}
    if kinds is None:
        kinds = DEFAULT_KINDS
    if isinstance(kinds, (str, Kind)):
        kinds = [kinds]
    if not isinstance(kinds, Iterable):
        raise TypeError(f"kinds must be a list of kind names or Kind instances, got {kinds!r}")
    resolved: list[Kind] = []
    for kind in kinds:
        if isinstance(kind, str):
            if kind not in BUILTIN:
                raise unknown_kind(kind, list(BUILTIN))
            kind = built[kind]
        elif isinstance(kind, type) and issubclass(kind, Kind):
            raise TypeError(f"kinds holds the class {kind.__name__}; pass an instance: {kind.__name__}()")
        check_kind_class(kind, BUILTIN)
        if any(k.name == kind.name for k in resolved):
            raise ValueError(f"kinds names {kind.name!r} twice; give each kind once")
        resolved.append(kind)
    if not resolved:
        raise ValueError("kinds is empty: name at least one kind, e.g. kinds=['gradcam']")
    order = list(BUILTIN)
    return sorted(resolved, key=lambda k: order.index(k.name) if k.name in order else len(order))


def apply_every(every: int | Mapping[str, int] | None, kinds: list[Kind]) -> None:
    """Set each kind's interval: ``every`` is None (each kind's own default), one int for every kind, or a mapping
    ``{kind name: interval}`` overriding the kinds it names (names of built-in kinds not logged are accepted).
    One int does not override a kind built with an interval of its own (``MyKind(every=50)``)."""
    if every is None:
        return
    if isinstance(every, Mapping):
        known = [k.name for k in kinds] + [n for n in BUILTIN if n not in {k.name for k in kinds}]
        for name, value in every.items():
            if name not in known:
                raise unknown_kind(name, known)
            check_every(name, value)
        for kind in kinds:
            if kind.name in every:
                kind.every = every[kind.name]
        return
    if isinstance(every, bool) or not isinstance(every, int):
        raise TypeError(f"every must be a positive int or a mapping {{kind: int}}, got {every!r}")
    check_every("every", every)
    for kind in kinds:
        if not getattr(kind, "every_given", False):  # a kind built with its own every keeps it
            kind.every = every


def due_kinds(kinds: Iterable[Kind], step: int, last_logged: Mapping[str, int] | None = None) -> list[Kind]:
    """The kinds whose interval divides ``step`` (at step 0 only those logged at step 0), leaving out those
    already logged at this step."""
    last = last_logged or {}
    return [k for k in kinds if step % k.every == 0 and (step or k.at_step_zero) and last.get(k.name) != step]
