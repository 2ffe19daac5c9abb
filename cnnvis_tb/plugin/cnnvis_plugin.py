"""The "CNN Vis" TensorBoard plugin: every run and every logged step of the cnnvis images, side by side.

The images are ordinary ``SummaryWriter.add_image`` summaries owned by TensorBoard's ``images``
plugin, under tags ``cnnvis/<kind>/<layer>/<view>`` (see :mod:`cnnvis_tb.tags`). This plugin reads
them only through ``context.data_provider``, so it works with the Rust data server (the default
``--load_fast``), with ``--load_fast=false`` and under ``--path_prefix``.

Routes (under ``/data/plugin/cnnvis``; errors are JSON ``{"error": message}`` with status 400/404):

* ``/index``: ``{"runs": [run], "kinds": [{"kind", "layers": [{"layer", "views": [{"view", "probe",
  "tag", "runs": [run]}]}]}]}``, the runs holding cnnvis images and the kind -> layer -> view tree.
* ``/steps?tag=T``: ``{"tag", "width", "height", "runs": [{"run", "steps": [int]}]}``, every logged
  step of ``T`` per run, and the size of its images.
* ``/image?run=R&tag=T&step=S``: the image bytes (PNG as written by ``add_image``).
* ``/text?run=R``: ``{"run", "texts": [{"tag", "step", "text"}]}``, the latest value of each
  ``cnnvis/summary/...`` text (the layer table).
* ``/index.js`` and ``/static/*``: the tab's ES modules and stylesheet, from a fixed whitelist.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.context import RequestContext
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from cnnvis_tb import tags
from cnnvis_tb.plugin import metadata

#: Every static file the plugin serves: route -> (file of package ``cnnvis_tb.frontend``, type).
#: Requests never name a file; only these routes exist.
STATIC_FILES: dict[str, tuple[str, str]] = {
    "/index.js": ("index.js", "text/javascript"),
    "/static/api.js": ("api.js", "text/javascript"),
    "/static/dom.js": ("dom.js", "text/javascript"),
    "/static/state.js": ("state.js", "text/javascript"),
    "/static/views.js": ("views.js", "text/javascript"),
    "/static/lightbox.js": ("lightbox.js", "text/javascript"),
    "/static/style.css": ("style.css", "text/css"),
}

_FRONTEND_PACKAGE = "cnnvis_tb.frontend"
_JSON = "application/json"

#: Longest query value accepted (run names are paths below the logdir; Linux caps those at 4096).
MAX_ARG_CHARS = 4096
#: Steps are int64 in event files.
MAX_STEP = 2**63 - 1
_STEP = re.compile(r"[0-9]{1,19}", re.ASCII)
_NATURAL_CHUNK = re.compile(r"([0-9]+)", re.ASCII)

#: Images of a (run, tag, step) only change when a restarted run rewrites that step; let the
#: browser reuse them for a while (switching back and forth between layers) but not for long.
_IMAGE_CACHE_SECONDS = 600

#: How many tags' ``/steps`` answers to keep (each is about 50 bytes per run and logged step).
_STEPS_CACHE_TAGS = 16

_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

Handler = Callable[["CnnVisPlugin", wrappers.Request], wrappers.Response]


class StepsCache:
    """Recent ``/steps`` answers, each reused while the version of its tag's data is unchanged."""

    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: Any) -> Any | None:
        """The answer stored for ``key`` at ``version``, else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, version: Any, answer: Any) -> None:
        """Stores ``answer``, dropping the least recently used key beyond the size."""
        with self._lock:
            self._entries[key] = (version, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _json_errors(handler: Handler) -> Handler:
    """Turns `errors.PublicError` (ours and the data provider's) into a JSON error response."""

    @functools.wraps(handler)
    def wrapper(self: CnnVisPlugin, request: wrappers.Request) -> wrappers.Response:
        try:
            return handler(self, request)
        except errors.PublicError as e:
            return http_util.Respond(request, {"error": str(e)}, _JSON, code=e.http_code, headers=e.headers)

    return wrapper


class CnnVisPlugin(base_plugin.TBPlugin):
    """Serves the cnnvis image tags, their steps and their bytes to the "CNN Vis" tab."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        """Keeps the data provider and how many steps per tag to ask it for.

        Args:
          context: A `base_plugin.TBContext`; only `data_provider` and `sampling_hints` are used.
        """
        self._data_provider = context.data_provider
        hint = (context.sampling_hints or {}).get(metadata.IMAGES_PLUGIN_NAME) or 0
        self._downsample = max(metadata.ALL_STEPS, hint)
        self._active = False
        self._steps_cache = StepsCache(_STEPS_CACHE_TAGS)

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps: dict[str, Callable] = {
            "/index": self._serve_index,
            "/steps": self._serve_steps,
            "/image": self._serve_image,
            "/text": self._serve_text,
        }
        for route, (filename, content_type) in STATIC_FILES.items():
            apps[route] = _static_file_app(filename, content_type)
        return apps

    def is_active(self) -> bool:
        """Whether any run holds a cnnvis image.

        TensorBoard asks on every ``/data/plugins_listing`` (each page load and reload). Once data has
        been seen the answer stays yes, so the listing never again pays for a scan of every image series.
        """
        if not self._active and self._data_provider is not None:
            mapping = self._data_provider.list_blob_sequences(
                RequestContext(), experiment_id="", plugin_name=metadata.IMAGES_PLUGIN_NAME
            )
            self._active = any(image_tag_parts(tag) for tag_to_series in mapping.values() for tag in tag_to_series)
        return self._active

    def data_plugin_names(self) -> tuple[str, ...]:
        # Naming "images" here would make TensorBoard enable the tab whenever any run holds any
        # image at all; naming none makes it ask `is_active`, which looks for cnnvis tags only.
        return ()

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name=metadata.TAB_NAME)

    # Routes.

    @wrappers.Request.application
    @_json_errors
    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_scope(request)
        mapping = self._data_provider.list_blob_sequences(
            ctx, experiment_id=experiment, plugin_name=metadata.IMAGES_PLUGIN_NAME
        )
        runs_by_tag: dict[str, list[str]] = {}
        for run, tag_to_series in mapping.items():
            for tag in tag_to_series:
                if image_tag_parts(tag):
                    runs_by_tag.setdefault(tag, []).append(run)
        return http_util.Respond(request, build_index(runs_by_tag), _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_steps(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_scope(request)
        tag = _image_tag_arg(request)
        # Listing a tag is cheap; reading every step of it is not (50 runs x 1000 steps take a second
        # or more). The listing's newest step and wall time per run tell whether anything changed.
        listing = self._data_provider.list_blob_sequences(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.IMAGES_PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(tags=[tag]),
        )
        version = sorted(
            (run, series.max_step, series.max_wall_time, series.max_length)
            for run, tag_to_series in listing.items()
            if (series := tag_to_series.get(tag)) is not None
        )
        if not version:
            raise errors.NotFoundError(f"no run holds images under tag {_quote(tag)}")
        answer = self._steps_cache.get((experiment, tag), version)
        if answer is None:
            answer = self._steps_answer(ctx, experiment, tag)
            self._steps_cache.put((experiment, tag), version, answer)
        return http_util.Respond(request, answer, _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_image(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_scope(request)
        run = _string_arg(request, "run")
        tag = _image_tag_arg(request)
        step = parse_step(_string_arg(request, "step"))
        data = self._read_series(ctx, experiment, tag, runs=[run]).get(run)
        if data is None:
            raise errors.NotFoundError(f"no images for run {_quote(run)} under tag {_quote(tag)}")
        datum = next((d for d in data if d.step == step), None)
        # An add_image value is [width, height, encoded image, ...]; the tab shows the first image.
        if datum is None or len(datum.values) < 3:
            raise errors.NotFoundError(f"no image at step {step} for run {_quote(run)} under tag {_quote(tag)}")
        blob = self._data_provider.read_blob(ctx, blob_key=datum.values[2].blob_key)
        content_type = image_content_type(blob)
        if content_type is None:
            raise errors.NotFoundError(f"the value at step {step} is not an encoded image")
        return http_util.Respond(request, blob, content_type, expires=_IMAGE_CACHE_SECONDS)

    @wrappers.Request.application
    @_json_errors
    def _serve_text(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_scope(request)
        run = _string_arg(request, "run")
        if run not in {r.run_name for r in self._data_provider.list_runs(ctx, experiment_id=experiment)}:
            raise errors.NotFoundError(f"no run named {_quote(run)}")
        mapping = self._data_provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.TEXT_PLUGIN_NAME,
            downsample=1,  # keeps the latest value of each tag
            run_tag_filter=provider.RunTagFilter(runs=[run]),
        )
        texts = [
            {"tag": tag, "step": data[-1].step, "text": text_of(data[-1].numpy)}
            for tag, data in sorted(mapping.get(run, {}).items())
            if data and _is_summary_tag(tag)
        ]
        return http_util.Respond(request, {"run": run, "texts": texts}, _JSON)

    def _steps_answer(self, ctx: RequestContext, experiment: str, tag: str) -> dict[str, Any]:
        """The ``/steps`` answer: every logged step of ``tag`` per run, and the size of its images."""
        series = self._read_series(ctx, experiment, tag)
        if not series:
            raise errors.NotFoundError(f"no run holds images under tag {_quote(tag)}")
        runs = sorted(series, key=natural_key)
        width, height = self._image_size(ctx, [series[run][-1] for run in runs])
        return {
            "tag": tag,
            "width": width,
            "height": height,
            "runs": [{"run": run, "steps": sorted({datum.step for datum in series[run]})} for run in runs],
        }

    def _image_size(
        self, ctx: RequestContext, data: Iterable[provider.BlobSequenceDatum]
    ) -> tuple[int | None, int | None]:
        """Width and height of the images, from the first two values ``add_image`` stores beside each.

        The tab sizes its cells from them before any image arrives, so that the first screen
        requests exactly the images it shows. The first datum whose values can be read answers:
        the Rust data server hands out blob keys it cannot parse back when a run or tag name holds
        a ``"`` or a ``\\``, and one such run must not take the whole answer down.
        """
        for datum in data:
            if len(datum.values) < 3:
                continue
            try:
                width, height = (
                    _parse_dimension(self._data_provider.read_blob(ctx, blob_key=value.blob_key))
                    for value in datum.values[:2]
                )
            except errors.PublicError:
                continue
            return width, height
        return None, None

    def _read_series(
        self,
        ctx: RequestContext,
        experiment: str,
        tag: str,
        runs: Sequence[str] | None = None,
    ) -> dict[str, list[provider.BlobSequenceDatum]]:
        """Every step of one image tag, per run holding it (all runs, or only ``runs``)."""
        mapping = self._data_provider.read_blob_sequences(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.IMAGES_PLUGIN_NAME,
            downsample=self._downsample,
            run_tag_filter=provider.RunTagFilter(runs=runs, tags=[tag]),
        )
        return {run: tag_to_data[tag] for run, tag_to_data in mapping.items() if tag in tag_to_data}


def _static_file_app(filename: str, content_type: str) -> Callable:
    """A WSGI app serving one whitelisted file of the frontend package."""

    @wrappers.Request.application
    def serve(request: wrappers.Request) -> wrappers.Response:
        body = importlib.resources.files(_FRONTEND_PACKAGE).joinpath(filename).read_bytes()
        return http_util.Respond(request, body, content_type)

    return serve


# Request arguments.


def _request_scope(request: wrappers.Request) -> tuple[RequestContext, str]:
    return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


def _string_arg(request: wrappers.Request, name: str) -> str:
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


def _image_tag_arg(request: wrappers.Request) -> str:
    tag = _string_arg(request, "tag")
    if image_tag_parts(tag) is None:
        raise errors.InvalidArgumentError(
            f"{_quote(tag)} is not a cnnvis image tag: expected cnnvis/<kind>/<layer>/<view> "
            f"with kind one of {', '.join(tags.IMAGE_KINDS)}"
        )
    return tag


def parse_step(text: str) -> int:
    """The step named by ``text``: ASCII digits only, from 0 to `MAX_STEP`."""
    if not _STEP.fullmatch(text):
        raise errors.InvalidArgumentError(f"step must be a non-negative integer, got {_quote(text)}")
    step = int(text)
    if step > MAX_STEP:
        raise errors.InvalidArgumentError(f"step must be at most {MAX_STEP}, got {step}")
    return step


def _parse_dimension(blob: bytes) -> int | None:
    """A width or height as ``add_image`` stores it (ASCII digits); ``None`` when it is not one."""
    text = blob.decode("ascii", "replace")
    return int(text) if text.isdigit() and len(text) < 7 else None


def _quote(value: str, limit: int = 80) -> str:
    """``repr`` of a user-given value for an error message, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


# Tags, order and answers.


def image_tag_parts(tag: str) -> tags.TagParts | None:
    """The parts of ``tag`` when it is a cnnvis image tag, else ``None``."""
    parts = tags.parse_tag(tag)
    return parts if parts is not None and parts.kind in tags.IMAGE_KINDS else None


def _is_summary_tag(tag: str) -> bool:
    parts = tags.parse_tag(tag)
    return parts is not None and parts.kind == "summary"


def natural_key(text: str) -> tuple[list[tuple[int, Any]], str]:
    """Sort key ordering embedded numbers by value: ``features.3`` before ``features.10``."""
    # split() with a capturing group puts the digit runs at the odd positions.
    chunks = _NATURAL_CHUNK.split(text)
    return [(0, int(chunk)) if i % 2 else (1, chunk) for i, chunk in enumerate(chunks) if chunk], text


def _view_key(view: str) -> tuple[bool, int, tuple[list[tuple[int, Any]], str]]:
    probe = tags.probe_index(view)
    return (probe is None, probe or 0, natural_key(view))


def build_index(runs_by_tag: dict[str, Iterable[str]]) -> dict[str, Any]:
    """The ``/index`` answer for cnnvis image tags mapped to the runs holding them.

    Kinds come in `tags.IMAGE_KINDS` order, layers and runs in natural order, probe views by
    probe index and before the other views. Lists (not objects) keep that order in JavaScript
    whatever the names (a layer called ``0`` would otherwise jump ahead).
    """
    tree: dict[str, dict[str, dict[str, tuple[str, list[str]]]]] = {}
    all_runs: set[str] = set()
    for tag, runs in runs_by_tag.items():
        parts = image_tag_parts(tag)
        if parts is None:
            continue
        run_list = sorted(set(runs), key=natural_key)
        all_runs.update(run_list)
        views = tree.setdefault(parts.kind, {}).setdefault(parts.layer, {})
        views[parts.view] = (tag, run_list)
    kinds = [
        {
            "kind": kind,
            "layers": [
                {
                    "layer": layer,
                    "views": [
                        {
                            "view": view,
                            "probe": tags.probe_index(view),
                            "tag": tag,
                            "runs": runs,
                        }
                        for view, (tag, runs) in sorted(
                            tree[kind][layer].items(),
                            key=lambda item: _view_key(item[0]),
                        )
                    ],
                }
                for layer in sorted(tree[kind], key=natural_key)
            ],
        }
        for kind in tags.IMAGE_KINDS
        if kind in tree
    ]
    return {"runs": sorted(all_runs, key=natural_key), "kinds": kinds}


def image_content_type(data: bytes) -> str | None:
    """MIME type of an encoded PNG / JPEG / GIF image, ``None`` for anything else."""
    return next(
        (mime for signature, mime in _IMAGE_SIGNATURES if data.startswith(signature)),
        None,
    )


def text_of(value: Any) -> str:
    """A text summary's value (a numpy array of bytes or str) as one string, one line per element."""
    return "\n".join(
        item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in value.ravel()
    )
