"""Query arguments of the plugin's routes: read, checked and quoted back in error messages.

Every value a request carries goes through here before it reaches the data provider; a value that
does not fit raises `tensorboard.errors.InvalidArgumentError` (a JSON 400). No value ever names a file.
"""

from __future__ import annotations

import re

from tensorboard import errors, plugin_util
from tensorboard.context import RequestContext
from werkzeug import wrappers

from cnnvis_tb.plugin import metadata

__all__ = ["MAX_ARG_CHARS", "MAX_STEP", "request_scope", "string_arg", "image_tag_arg", "parse_step", "quote"]

#: Longest query value accepted (run names are paths below the logdir; Linux caps those at 4096).
MAX_ARG_CHARS = 4096
#: Steps are int64 in event files.
MAX_STEP = 2**63 - 1
_STEP = re.compile(r"[0-9]{1,19}", re.ASCII)


def request_scope(request: wrappers.Request) -> tuple[RequestContext, str]:
    """TensorBoard's request context and the experiment id of ``request`` (``""`` for a local logdir)."""
    return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


def string_arg(request: wrappers.Request, name: str) -> str:
    """The one non-empty value of query argument ``name``, at most `MAX_ARG_CHARS` long."""
    values = request.args.getlist(name)
    if not values:
        raise errors.InvalidArgumentError(f"missing query argument {name!r}")
    if len(values) > 1:
        raise errors.InvalidArgumentError(f"query argument {name!r} given {len(values)} times")
    value = values[0]
    if not value:
        raise errors.InvalidArgumentError(f"query argument {name!r} is empty")
    if len(value) > MAX_ARG_CHARS:
        raise errors.InvalidArgumentError(f"query argument {name!r} is longer than {MAX_ARG_CHARS} characters")
    return value


def image_tag_arg(request: wrappers.Request) -> str:
    """Query argument ``tag``, which must have the shape of a cnnvis image tag (see `metadata.image_tag_parts`)."""
    tag = string_arg(request, "tag")
    if metadata.image_tag_parts(tag) is None:
        raise errors.InvalidArgumentError(
            f"{quote(tag)} is not a cnnvis image tag: expected cnnvis/<kind>/<layer>/<view>, where <kind> is a "
            "kind's name (1-64 letters, digits or '_ . + -', starting with a letter or digit; not summary or metrics)"
        )
    return tag


def parse_step(text: str) -> int:
    """The step named by ``text``: ASCII digits only, from 0 to `MAX_STEP`."""
    if not _STEP.fullmatch(text):
        raise errors.InvalidArgumentError(f"step must be a non-negative integer, got {quote(text)}")
    step = int(text)
    if step > MAX_STEP:
        raise errors.InvalidArgumentError(f"step must be at most {MAX_STEP}, got {step}")
    return step


def quote(value: str, limit: int = 80) -> str:
    """``repr`` of a user-given value for an error message, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "…")
