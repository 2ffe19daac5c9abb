"""The "CNN Vis" TensorBoard plugin: every run and every logged step of the cnnvis images, side by side.

The images are ordinary ``SummaryWriter.add_image`` summaries owned by TensorBoard's ``images``
plugin, under tags ``cnnvis/<kind>/<layer>/<view>`` (see :mod:`cnnvis_tb.tags`), for any kind name,
built-in or a user's own. This plugin reads them only through ``context.data_provider``, so it works
with the Rust data server (the default ``--load_fast``), with ``--load_fast=false`` and under
``--path_prefix``. This module holds the routes only; each answer is built by its own module.

Routes (under ``/data/plugin/cnnvis``; errors are JSON ``{"error": message}`` with status 400/404):

* ``/index``: ``{"runs": [run], "kinds": [{"kind", "label", "layers": [{"layer", "views": [{"view",
  "probe", "tag", "runs": [run]}]}]}]}``, the runs holding cnnvis images and the kind -> layer -> view
  tree, kinds labelled and ordered by the runs' kinds tables (:mod:`cnnvis_tb.plugin.index`).
* ``/steps?tag=T``: ``{"tag", "width", "height", "runs": [{"run", "steps": [int]}]}``, every logged
  step of ``T`` per run, and the size of its images (:mod:`cnnvis_tb.plugin.images`).
* ``/image?run=R&tag=T&step=S``: the image bytes (PNG as written by ``add_image``).
* ``/text?run=R``: ``{"run", "texts": [{"tag", "step", "text"}]}``, the latest value of each
  ``cnnvis/summary/...`` text (the layer table, the kinds table; :mod:`cnnvis_tb.plugin.texts`).
* ``/panels?run=R&tag=T``: ``{"run", "tag", "steps": {step: [{"key", "box": [x, y, w, h], "text": [line]}]}}``,
  where each panel of image ``T`` lies and its caption as text, per step (:func:`cnnvis_tb.plugin.texts.read_panels`).
* ``/metrics``: ``{"runs", "series": [{"tag", "kind", "layer", "name", "runs": [{"run", "steps", "values"}]}]}``,
  every ``cnnvis/metrics/...`` scalar of every run, for the trends view (:mod:`cnnvis_tb.plugin.metrics`).
* ``/index.js`` and ``/static/*``: the tab's ES modules and stylesheet, from a fixed whitelist.

Query arguments are checked by :mod:`cnnvis_tb.plugin.args` before anything is read.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable

from tensorboard import errors
from tensorboard.backend import http_util
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from cnnvis_tb.plugin import args, index, metadata, metrics, texts
from cnnvis_tb.plugin.images import ImageSeries

__all__ = ["STATIC_FILES", "CnnVisPlugin"]

#: Every static file the plugin serves: route -> (file of package ``cnnvis_tb.frontend``, type).
#: Requests never name a file; only these routes exist.
STATIC_FILES: dict[str, tuple[str, str]] = {
    "/index.js": ("index.js", "text/javascript"),
    "/static/app.js": ("app.js", "text/javascript"),
    "/static/api.js": ("api.js", "text/javascript"),
    "/static/controls.js": ("controls.js", "text/javascript"),
    "/static/dom.js": ("dom.js", "text/javascript"),
    "/static/lightbox.js": ("lightbox.js", "text/javascript"),
    "/static/messages.js": ("messages.js", "text/javascript"),
    "/static/state.js": ("state.js", "text/javascript"),
    "/static/trends.js": ("trends.js", "text/javascript"),
    "/static/views.js": ("views.js", "text/javascript"),
    "/static/style.css": ("style.css", "text/css"),
}

_FRONTEND_PACKAGE = "cnnvis_tb.frontend"
_JSON = "application/json"

#: Images of a (run, tag, step) only change when a restarted run rewrites that step; let the
#: browser reuse them for a while (switching back and forth between layers) but not for long.
_IMAGE_CACHE_SECONDS = 600

Handler = Callable[["CnnVisPlugin", wrappers.Request], wrappers.Response]


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
        self._images = ImageSeries(self._data_provider, downsample=max(metadata.ALL_STEPS, hint))
        self._active = False

    def get_plugin_apps(self) -> dict[str, Callable]:
        """Route -> WSGI app: the JSON routes, the image route and the whitelisted static files."""
        apps: dict[str, Callable] = {
            "/index": self._serve_index,
            "/steps": self._serve_steps,
            "/image": self._serve_image,
            "/text": self._serve_text,
            "/metrics": self._serve_metrics,
            "/panels": self._serve_panels,
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
            self._active = any(
                metadata.image_tag_parts(tag) for tag_to_series in mapping.values() for tag in tag_to_series
            )
        return self._active

    def data_plugin_names(self) -> tuple[str, ...]:
        """No summary plugin's name: TensorBoard then asks `is_active` whether to enable the tab."""
        # Naming "images" here would make TensorBoard enable the tab whenever any run holds any
        # image at all; naming none makes it ask `is_active`, which looks for cnnvis tags only.
        return ()

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        """The tab: an ES module (``/index.js``) loaded in an iframe, titled `metadata.TAB_NAME`."""
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name=metadata.TAB_NAME)

    # Routes.

    @wrappers.Request.application
    @_json_errors
    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        return http_util.Respond(request, index.read_index(self._data_provider, ctx, experiment), _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_steps(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        tag = args.image_tag_arg(request)
        return http_util.Respond(request, self._images.steps(ctx, experiment, tag), _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_image(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        run = args.string_arg(request, "run")
        tag = args.image_tag_arg(request)
        step = args.parse_step(args.string_arg(request, "step"))
        blob, content_type = self._images.image(ctx, experiment, run, tag, step)
        return http_util.Respond(request, blob, content_type, expires=_IMAGE_CACHE_SECONDS)

    @wrappers.Request.application
    @_json_errors
    def _serve_text(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        run = args.string_arg(request, "run")
        return http_util.Respond(request, texts.read_texts(self._data_provider, ctx, experiment, run), _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_panels(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        run = args.string_arg(request, "run")
        tag = args.image_tag_arg(request)
        answer = texts.read_panels(self._data_provider, ctx, experiment, run, tag)
        return http_util.Respond(request, answer, _JSON)

    @wrappers.Request.application
    @_json_errors
    def _serve_metrics(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = args.request_scope(request)
        return http_util.Respond(request, metrics.read_metrics(self._data_provider, ctx, experiment), _JSON)


def _static_file_app(filename: str, content_type: str) -> Callable:
    """A WSGI app serving one whitelisted file of the frontend package."""

    @wrappers.Request.application
    def serve(request: wrappers.Request) -> wrappers.Response:
        body = importlib.resources.files(_FRONTEND_PACKAGE).joinpath(filename).read_bytes()
        return http_util.Respond(request, body, content_type)

    return serve
