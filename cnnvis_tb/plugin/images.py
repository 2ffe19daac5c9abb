"""The cnnvis image series, read through TensorBoard's data provider: the ``/steps`` and ``/image`` answers.

Listing a tag (``list_blob_sequences``) is cheap; reading its series (``read_blob_sequences``) is not:
it hands back a blob key for every value of every logged step (50 runs x 1,000 steps take a second or
more). So what a read found is cached, and reused while the listing says the series has not changed:
its newest step, newest wall time and longest value per run. A run that logs a new step moves the
first two; one that rewrites a step (a restarted run) moves the wall time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from tensorboard import errors
from tensorboard.context import RequestContext
from tensorboard.data import provider

from cnnvis_tb.plugin import metadata
from cnnvis_tb.plugin.args import quote
from cnnvis_tb.plugin.index import natural_key

__all__ = ["STEPS_CACHE_TAGS", "IMAGE_CACHE_SERIES", "VersionedCache", "ImageSeries", "image_content_type"]

#: How many tags' ``/steps`` answers to keep (each is about 50 bytes per run and logged step).
STEPS_CACHE_TAGS = 16
#: How many (run, tag) step -> blob key maps to keep: the grid shows one tag for every run, so this
#: is room for a few tags of many runs. Each holds one key (100-200 bytes) per logged step, a small
#: share of the images TensorBoard itself keeps in memory for that series.
IMAGE_CACHE_SERIES = 256

_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class VersionedCache:
    """A bounded map of recent values, each reused only while the version it was stored at is current.

    The least recently used key goes first when the cache is full. Safe to share between the
    threads TensorBoard serves requests on.
    """

    def __init__(self, size: int):
        """Keeps at most ``size`` keys."""
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: Hashable, version: Any) -> Any | None:
        """The value stored for ``key`` at ``version``, else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, version: Any, value: Any) -> None:
        """Stores ``value`` for ``key`` at ``version``, dropping the least recently used key beyond the size."""
        with self._lock:
            self._entries[key] = (version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _version(series: provider.BlobSequenceTimeSeries) -> tuple[Any, Any, Any]:
    return (series.max_step, series.max_wall_time, series.max_length)


def _image_blob_keys(data: Iterable[provider.BlobSequenceDatum]) -> dict[int, str]:
    """Step -> blob key of its encoded image. An ``add_image`` value is [width, height, encoded image, ...]."""
    # Providers hand out one datum per step; were there several, the last (latest written) wins.
    return {datum.step: datum.values[2].blob_key for datum in data if len(datum.values) >= 3}


class ImageSeries:
    """Reads cnnvis image series through a data provider, with the caches that keep ``/steps`` and ``/image`` cheap."""

    def __init__(self, data_provider: provider.DataProvider, downsample: int):
        """Reads through ``data_provider``, asking for up to ``downsample`` steps per series."""
        self._data_provider = data_provider
        self._downsample = downsample
        self._steps = VersionedCache(STEPS_CACHE_TAGS)
        #: (experiment, run, tag) -> step -> blob key of the image.
        self._blob_keys = VersionedCache(IMAGE_CACHE_SERIES)

    def steps(self, ctx: RequestContext, experiment: str, tag: str) -> dict[str, Any]:
        """The ``/steps`` answer: ``{"tag", "width", "height", "runs": [{"run", "steps": [int]}]}``.

        Every logged step of ``tag`` per run, and the size of its images. Raises
        `errors.NotFoundError` when no run holds ``tag``.
        """
        listing = self._listing(ctx, experiment, tag)
        version = sorted((run, *_version(series)) for run, series in listing.items())
        if not version:
            raise errors.NotFoundError(f"no run holds images under tag {quote(tag)}")
        answer = self._steps.get((experiment, tag), version)
        if answer is None:
            series = self._read(ctx, experiment, tag)
            # The tab asks for these runs' images next: what this read found saves one read each.
            # A step logged since the listing only makes the stored version older than its map, so
            # the next listing rereads; never the other way round.
            for run, data in series.items():
                if run in listing:
                    self._blob_keys.put((experiment, run, tag), _version(listing[run]), _image_blob_keys(data))
            answer = self._steps_answer(ctx, tag, series)
            self._steps.put((experiment, tag), version, answer)
        return answer

    def image(self, ctx: RequestContext, experiment: str, run: str, tag: str, step: int) -> tuple[bytes, str]:
        """The encoded image of ``run`` under ``tag`` at ``step``, and its MIME type.

        Reads the run's series only when its listing changed since the last read. Raises
        `errors.NotFoundError` when there is no such image.
        """
        series = self._listing(ctx, experiment, tag, runs=[run]).get(run)
        if series is None:
            raise errors.NotFoundError(f"no images for run {quote(run)} under tag {quote(tag)}")
        key, version = (experiment, run, tag), _version(series)
        keys = self._blob_keys.get(key, version)
        if keys is None:
            keys = _image_blob_keys(self._read(ctx, experiment, tag, runs=[run]).get(run, ()))
            self._blob_keys.put(key, version, keys)
        blob_key = keys.get(step)
        if blob_key is None:
            raise errors.NotFoundError(f"no image at step {step} for run {quote(run)} under tag {quote(tag)}")
        blob = self._data_provider.read_blob(ctx, blob_key=blob_key)
        content_type = image_content_type(blob)
        if content_type is None:
            raise errors.NotFoundError(f"the value at step {step} is not an encoded image")
        return blob, content_type

    def _steps_answer(
        self, ctx: RequestContext, tag: str, series: dict[str, list[provider.BlobSequenceDatum]]
    ) -> dict[str, Any]:
        if not series:
            raise errors.NotFoundError(f"no run holds images under tag {quote(tag)}")
        runs = sorted(series, key=natural_key)
        width, height = self._image_size(ctx, [series[run][-1] for run in runs if series[run]])
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

    def _listing(
        self, ctx: RequestContext, experiment: str, tag: str, runs: Sequence[str] | None = None
    ) -> dict[str, provider.BlobSequenceTimeSeries]:
        """Run -> the listing of ``tag`` (newest step, wall time, longest value), for the runs holding it."""
        mapping = self._data_provider.list_blob_sequences(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.IMAGES_PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=runs, tags=[tag]),
        )
        return {run: tag_to_series[tag] for run, tag_to_series in mapping.items() if tag in tag_to_series}

    def _read(
        self, ctx: RequestContext, experiment: str, tag: str, runs: Sequence[str] | None = None
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


def _parse_dimension(blob: bytes) -> int | None:
    """A width or height as ``add_image`` stores it (ASCII digits); ``None`` when it is not one."""
    text = blob.decode("ascii", "replace")
    return int(text) if text.isdigit() and len(text) < 7 else None


def image_content_type(data: bytes) -> str | None:
    """MIME type of an encoded PNG / JPEG / GIF image, ``None`` for anything else."""
    return next((mime for signature, mime in _IMAGE_SIGNATURES if data.startswith(signature)), None)
