"""The "CNN Vis" plugin's routes, in process: event files -> TensorBoard's data provider -> WSGI.

Events are written with the stock ``SummaryWriter.add_image`` under the tag scheme of
``cnnvis_tb.tags``; every image has one colour that encodes its run, step and tag, so an answer can
be traced back to what was written. Kinds tables (``SummaryWriter.add_text`` of ``tags.kinds_table``)
label and order the kinds, a user's own kind (``channel_means``) among them.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester, data_provider, plugin_event_multiplexer
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.core import core_plugin
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import image as image_summary
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

from cnnvis_tb import tags
from cnnvis_tb.plugin import cnnvis_plugin, images, index, metadata
from cnnvis_tb.plugin.loader import CnnVisLoader

ROUTE = "/data/plugin/cnnvis"

GRADCAM_0 = tags.image_tag("gradcam", "layer4", tags.probe_view(0))
GRADCAM_1 = tags.image_tag("gradcam", "layer4", tags.probe_view(1))
FEATURES_3 = tags.image_tag("features", "features.3", tags.probe_view(0))
FEATURES_10 = tags.image_tag("features", "features.10", tags.probe_view(0))
KERNELS = tags.image_tag("kernels", "conv1", "grid")
ACTMAX = tags.image_tag("actmax", "features.3", "channels")
#: A user's own kind: the plugin knows it only from the data.
CHANNEL_MEANS = tags.image_tag("channel_means", "features.3", tags.probe_view(0))
IMAGE_TAGS = (GRADCAM_1, FEATURES_10, KERNELS, GRADCAM_0, ACTMAX, FEATURES_3, CHANNEL_MEANS)  # written out of order
#: The kinds tables of run_a and run_b. run_a comes first (natural run order): its labels and order win;
#: run_b adds kernels after them; no table lists actmax, which keeps its name and comes last.
KINDS_TABLE_A = tags.kinds_table(
    [
        ("channel_means", "Channel means", "mean of each channel"),
        ("gradcam", "Grad-CAM", ""),
        ("features", "Feature maps", ""),
        ("histograms", "Histograms", "listed, but holds no image: not in /index"),
    ]
)
KINDS_TABLE_B = tags.kinds_table([("kernels", "Kernels", ""), ("gradcam", "Not this label", "run_a labels it first")])
#: 25 logged steps: TensorBoard's default keeps 10 image steps per tag.
STEPS = tuple(range(0, 50, 2))
FULL_RUNS = ("run_a", "run_b")
#: run_c holds one cnnvis tag at two steps, and data the tab must ignore.
SPARSE_STEPS = (5, 7)
HEIGHT, WIDTH = 6, 8


def colour(run: str, step: int, tag: str) -> tuple[int, int, int]:
    return (step * 5 % 256, 40 + 60 * "abc".index(run[-1]), 30 * IMAGE_TAGS.index(tag))


def picture(run: str, step: int, tag: str) -> np.ndarray:
    """The CHW uint8 image logged for ``(run, step, tag)``: one colour, ``WIDTH`` x ``HEIGHT``."""
    return np.broadcast_to(np.array(colour(run, step, tag), np.uint8)[:, None, None], (3, HEIGHT, WIDTH)).copy()


def written_png(run: str, step: int, tag: str) -> bytes:
    """The exact bytes ``add_image`` stores for that picture (same encoder, same input)."""
    return image_summary(tag, picture(run, step, tag), dataformats="CHW").value[0].image.encoded_image_string


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    for run, table in zip(FULL_RUNS, (KINDS_TABLE_A, KINDS_TABLE_B), strict=True):
        with SummaryWriter(root / run) as writer:
            writer.add_text(tags.KINDS_TABLE_TAG, table, 0)
            for step in STEPS:
                for tag in IMAGE_TAGS:
                    writer.add_image(tag, picture(run, step, tag), step)
    with SummaryWriter(root / "run_c") as writer:
        for step in SPARSE_STEPS:
            writer.add_image(GRADCAM_0, picture("run_c", step, GRADCAM_0), step)
        writer.add_image("photos/cat", np.zeros((3, 4, 4), np.uint8), 0)
        writer.add_histogram(tags.histogram_tag("conv1.weight"), np.arange(10.0), 0)
        writer.add_text(tags.text_tag("model", "layers"), "| layer | type |\n| --- | --- |\n| conv1 | Conv2d |", 0)
        writer.add_text("notes", "not ours", 0)
    with SummaryWriter(root / "unrelated") as writer:
        writer.add_image("photos/dog", np.zeros((3, 4, 4), np.uint8), 0)
    return root


def tensorboard_flags(logdir: Path, *argv: str, fix: bool = True) -> argparse.Namespace:
    """Flags parsed by TensorBoard's own definitions, then fixed by the loaders as `tensorboard` does."""
    loaders = [core_plugin.CorePluginLoader(), CnnVisLoader()]
    parser = argparse.ArgumentParser()
    for loader in loaders:
        loader.define_flags(parser)
    flags = parser.parse_args(["--logdir", str(logdir), *argv])
    if fix:
        for loader in loaders:
            loader.fix_flags(flags)
    return flags


@dataclass
class Served:
    client: werkzeug_test.Client
    plugin: cnnvis_plugin.CnnVisPlugin
    multiplexer: plugin_event_multiplexer.EventMultiplexer


def serve(logdir: Path, *argv: str, fix: bool = True) -> Served:
    """The plugin behind TensorBoard's WSGI app, over a multiplexer sized as TensorBoard sizes it."""
    flags = tensorboard_flags(logdir, *argv, fix=fix)
    # As tensorboard's LocalDataIngester: default guidance, overridden by --samples_per_plugin.
    guidance = {**data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE, **flags.samples_per_plugin}
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE, tensor_size_guidance=guidance
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=str(logdir),
        flags=flags,
        multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
        sampling_hints=flags.samples_per_plugin,
    )
    plugin = CnnVisLoader().load(context)
    return Served(werkzeug_test.Client(application.TensorBoardWSGI([plugin]), wrappers.Response), plugin, multiplexer)


@pytest.fixture(scope="module")
def client(logdir) -> werkzeug_test.Client:
    return serve(logdir).client


def get_json(client: werkzeug_test.Client, route: str, **query: str) -> object:
    response = client.get(f"{ROUTE}/{route}", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return json.loads(response.get_data())


def test_index_lists_runs_kinds_layers_and_views(client):
    index = get_json(client, "index")
    everyone = list(FULL_RUNS)
    assert index == {
        "runs": ["run_a", "run_b", "run_c"],
        "kinds": [
            {
                "kind": "channel_means",
                "label": "Channel means",
                "layers": [
                    {
                        "layer": "features.3",
                        "views": [{"view": "probe_000", "probe": 0, "tag": CHANNEL_MEANS, "runs": everyone}],
                    }
                ],
            },
            {
                "kind": "gradcam",
                "label": "Grad-CAM",
                "layers": [
                    {
                        "layer": "layer4",
                        "views": [
                            {"view": "probe_000", "probe": 0, "tag": GRADCAM_0, "runs": ["run_a", "run_b", "run_c"]},
                            {"view": "probe_001", "probe": 1, "tag": GRADCAM_1, "runs": everyone},
                        ],
                    }
                ],
            },
            {
                "kind": "features",
                "label": "Feature maps",
                "layers": [  # natural order: features.3 before features.10
                    {
                        "layer": "features.3",
                        "views": [{"view": "probe_000", "probe": 0, "tag": FEATURES_3, "runs": everyone}],
                    },
                    {
                        "layer": "features.10",
                        "views": [{"view": "probe_000", "probe": 0, "tag": FEATURES_10, "runs": everyone}],
                    },
                ],
            },
            {
                "kind": "kernels",
                "label": "Kernels",
                "layers": [
                    {"layer": "conv1", "views": [{"view": "grid", "probe": None, "tag": KERNELS, "runs": everyone}]}
                ],
            },
            {
                "kind": "actmax",
                "label": "actmax",  # no table lists it: its name
                "layers": [
                    {
                        "layer": "features.3",
                        "views": [{"view": "channels", "probe": None, "tag": ACTMAX, "runs": everyone}],
                    }
                ],
            },
        ],
    }


def test_steps_lists_every_logged_step_of_every_run(client):
    answer = get_json(client, "steps", tag=GRADCAM_0)
    assert answer == {
        "tag": GRADCAM_0,
        "width": WIDTH,
        "height": HEIGHT,
        "runs": [
            {"run": "run_a", "steps": list(STEPS)},
            {"run": "run_b", "steps": list(STEPS)},
            {"run": "run_c", "steps": list(SPARSE_STEPS)},
        ],
    }
    assert len(STEPS) > 10


def test_without_the_loader_default_tensorboard_keeps_ten_steps(logdir):
    """The control for the test above: the default reservoir is what hides steps."""
    unfixed = serve(logdir, fix=False).client
    runs = get_json(unfixed, "steps", tag=GRADCAM_0)["runs"]
    assert [len(r["steps"]) for r in runs] == [10, 10, len(SPARSE_STEPS)]


def test_steps_are_read_once_and_again_when_new_steps_arrive(tmp_path, monkeypatch):
    with SummaryWriter(tmp_path / "run_a") as writer:
        for step in (0, 2):
            writer.add_image(GRADCAM_0, picture("run_a", step, GRADCAM_0), step)
    served = serve(tmp_path)
    reads = []
    read = served.plugin._data_provider.read_blob_sequences
    monkeypatch.setattr(
        served.plugin._data_provider, "read_blob_sequences", lambda *a, **k: reads.append(1) or read(*a, **k)
    )

    def steps() -> list[int]:
        return get_json(served.client, "steps", tag=GRADCAM_0)["runs"][0]["steps"]

    assert steps() == [0, 2]
    assert steps() == [0, 2]
    assert len(reads) == 1
    next_second()  # a later event file of the run must sort after the earlier ones (see next_second)
    with SummaryWriter(tmp_path / "run_a") as writer:
        writer.add_image(GRADCAM_0, picture("run_a", 4, GRADCAM_0), 4)
    served.multiplexer.AddRunsFromDirectory(str(tmp_path))
    served.multiplexer.Reload()
    assert steps() == [0, 2, 4]
    assert len(reads) == 2


def test_versioned_cache_keeps_the_latest_version_of_the_most_recent_keys():
    cache = images.VersionedCache(2)
    cache.put("a", 1, "answer a1")
    cache.put("b", 1, "answer b1")
    assert cache.get("a", 1) == "answer a1"  # a is now the most recent
    assert cache.get("a", 2) is None
    cache.put("c", 1, "answer c1")  # evicts b
    assert (cache.get("a", 1), cache.get("b", 1), cache.get("c", 1)) == ("answer a1", None, "answer c1")
    cache.put("a", 2, "answer a2")
    assert (cache.get("a", 1), cache.get("a", 2)) == (None, "answer a2")
    assert len(cache) == 2


def get_image(client: werkzeug_test.Client, run: str, tag: str, step: int) -> bytes:
    response = client.get(f"{ROUTE}/image", query_string={"run": run, "tag": tag, "step": str(step)})
    assert (response.status_code, response.mimetype) == (200, "image/png"), response.get_data(as_text=True)
    return response.get_data()


def count_series_reads(served: Served, monkeypatch) -> list[object]:
    """Wraps the data provider's ``read_blob_sequences``: the list grows by the run filter of each call."""
    reads: list[object] = []
    provider = served.plugin._data_provider
    read = provider.read_blob_sequences

    def counted(*args, **kwargs):
        run_tag_filter = kwargs.get("run_tag_filter")
        reads.append(sorted(run_tag_filter.runs) if run_tag_filter and run_tag_filter.runs else None)
        return read(*args, **kwargs)

    monkeypatch.setattr(provider, "read_blob_sequences", counted)
    return reads


def next_second() -> None:
    """Wait for the clock's next second. Event file names start with their creation second and end with a
    per-process counter, and TensorBoard reads a run's files in name order, moving only forward: a second file
    created in the same second whose counter has one digit more (…9 then …10) sorts first and is never read."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def reload(served: Served, logdir: Path) -> None:
    """What TensorBoard's reload thread does: pick up new files and new records."""
    served.multiplexer.AddRunsFromDirectory(str(logdir))
    served.multiplexer.Reload()


def served_by_tensorboard(logdir: Path, run: str, tag: str, step: int) -> bytes:
    """The image a fresh TensorBoard data provider serves for ``(run, tag, step)``, read on its own."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"images": metadata.ALL_STEPS})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    reader = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    ctx = RequestContext()
    series = reader.read_blob_sequences(ctx, experiment_id="", plugin_name="images", downsample=metadata.ALL_STEPS)
    (datum,) = [d for d in series[run][tag] if d.step == step]
    return reader.read_blob(ctx, blob_key=datum.values[2].blob_key)


def test_image_reads_its_series_once_and_again_when_it_changes(tmp_path, monkeypatch):
    for run in FULL_RUNS:
        with SummaryWriter(tmp_path / run) as writer:
            for step in (0, 2):
                writer.add_image(GRADCAM_0, picture(run, step, GRADCAM_0), step)
    served = serve(tmp_path)
    reads = count_series_reads(served, monkeypatch)

    for step in (0, 2, 0, 2):
        assert get_image(served.client, "run_a", GRADCAM_0, step) == written_png("run_a", step, GRADCAM_0)
    assert reads == [["run_a"]], "one read of run_a's series, then the cached step -> blob key map"
    missing = served.client.get(f"{ROUTE}/image", query_string={"run": "run_a", "tag": GRADCAM_0, "step": "4"})
    assert missing.status_code == 404 and "step 4" in error_of(missing)
    assert reads == [["run_a"]]

    # A new step: the listing's newest step moves, the map is read again, once.
    next_second()  # a later event file of the run must sort after the earlier ones (see next_second)
    with SummaryWriter(tmp_path / "run_a") as writer:
        writer.add_image(GRADCAM_0, picture("run_a", 4, GRADCAM_0), 4)
    reload(served, tmp_path)
    for step in (4, 0, 4):
        assert get_image(served.client, "run_a", GRADCAM_0, step) == written_png("run_a", step, GRADCAM_0)
    assert reads == [["run_a"], ["run_a"]]

    # A rewritten step (a restarted run logs step 2 again): the newest wall time moves and the map is read
    # again. The image is the one TensorBoard itself serves for that step.
    next_second()  # a later event file of the run must sort after the earlier ones (see next_second)
    with SummaryWriter(tmp_path / "run_a", filename_suffix=".restart") as writer:
        writer.add_image(GRADCAM_0, np.full((3, HEIGHT, WIDTH), 7, np.uint8), 2)
    reload(served, tmp_path)
    assert get_image(served.client, "run_a", GRADCAM_0, 2) == served_by_tensorboard(tmp_path, "run_a", GRADCAM_0, 2)
    assert reads == [["run_a"], ["run_a"], ["run_a"]]

    # /steps reads every run's series at once; what it found serves the images that follow.
    assert [r["steps"] for r in get_json(served.client, "steps", tag=GRADCAM_0)["runs"]] == [[0, 2, 4], [0, 2]]
    assert reads[3:] == [None]
    for run, step in (("run_b", 0), ("run_b", 2), ("run_a", 4)):
        assert get_image(served.client, run, GRADCAM_0, step) == written_png(run, step, GRADCAM_0)
    assert reads[4:] == []


def test_image_cache_is_bounded(tmp_path, monkeypatch):
    """With room for one series, alternating between two runs reads each time: the oldest map goes."""
    for run in FULL_RUNS:
        with SummaryWriter(tmp_path / run) as writer:
            writer.add_image(GRADCAM_0, picture(run, 0, GRADCAM_0), 0)
    monkeypatch.setattr(images, "IMAGE_CACHE_SERIES", 1)
    served = serve(tmp_path)
    reads = count_series_reads(served, monkeypatch)
    for run in ("run_a", "run_a", "run_b", "run_b", "run_a"):
        assert get_image(served.client, run, GRADCAM_0, 0) == written_png(run, 0, GRADCAM_0)
    assert reads == [["run_a"], ["run_b"], ["run_a"]]


def test_kinds_take_label_and_order_from_the_first_run_whose_table_lists_them(tmp_path):
    """run_9 comes before run_10 (natural order), and only a run's latest table counts."""
    kinds = ("channel_means", "beta", "zeta", "alpha", "kind10", "kind9")
    tables = {
        "run_9": [
            (0, [("beta", "Old beta", "replaced by the table of step 3")]),
            (3, [("channel_means", "Channel means", ""), ("beta", "Beta", "")]),
        ],
        "run_10": [(0, [("zeta", "Zeta, from run_10", ""), ("channel_means", "Means, from run_10", "")])],
    }
    for run, written in tables.items():
        with SummaryWriter(tmp_path / run) as writer:
            for step, table in written:
                writer.add_text(tags.KINDS_TABLE_TAG, tags.kinds_table(table), step)
            for kind in kinds:
                writer.add_image(tags.image_tag(kind, "conv1", "grid"), np.zeros((3, 2, 2), np.uint8), 0)
    with SummaryWriter(tmp_path / "run_9" / "other_text") as writer:  # text beside the table changes nothing
        writer.add_text(tags.text_tag("model", "layers"), "| layer |\n| --- |\n| alpha |", 0)
    answer = get_json(serve(tmp_path).client, "index")
    assert [(k["kind"], k["label"]) for k in answer["kinds"]] == [
        ("channel_means", "Channel means"),
        ("beta", "Beta"),
        ("zeta", "Zeta, from run_10"),
        ("alpha", "alpha"),  # the kinds no table lists, by (natural) name
        ("kind9", "kind9"),
        ("kind10", "kind10"),
    ]
    assert answer["runs"] == ["run_9", "run_10"]


def test_index_without_kinds_tables_lists_kinds_by_name_labelled_by_name(tmp_path):
    with SummaryWriter(tmp_path / "old_run") as writer:
        for kind in ("saliency", "gradcam", "features"):
            writer.add_image(tags.image_tag(kind, "conv1", "grid"), np.zeros((3, 2, 2), np.uint8), 0)
    answer = get_json(serve(tmp_path).client, "index")
    assert [(k["kind"], k["label"]) for k in answer["kinds"]] == [
        ("features", "features"),
        ("gradcam", "gradcam"),
        ("saliency", "saliency"),
    ]


def test_kind_labels_are_cut_and_blank_ones_fall_back_to_the_name():
    long_label = "x" * 500
    ordered = index.kind_order(
        ["a", "b", "c"],
        {"run": [tags.KindInfo("a", long_label), tags.KindInfo("b", "  \t "), tags.KindInfo("c", " C\n c ")]},
    )
    assert [info.name for info in ordered] == ["a", "b", "c"]
    assert ordered[0].label == "x" * (index.MAX_LABEL_CHARS - 1) + "…"
    assert [info.label for info in ordered[1:]] == ["b", "C c"]


def test_an_explicit_samples_per_plugin_wins(logdir):
    flags = tensorboard_flags(logdir, "--samples_per_plugin", "images=3,scalars=7,text=2")
    assert flags.samples_per_plugin == {"images": 3, "scalars": 7, "text": 2}
    limited = serve(logdir, "--samples_per_plugin", "images=3").client
    assert [len(r["steps"]) for r in get_json(limited, "steps", tag=KERNELS)["runs"]] == [3, 3]


def test_loader_defaults_images_and_texts_to_all_steps(logdir):
    every = metadata.ALL_STEPS
    assert tensorboard_flags(logdir).samples_per_plugin == {"images": every, "text": every}
    assert tensorboard_flags(logdir, fix=False).samples_per_plugin == {}
    assert tensorboard_flags(logdir, "--samples_per_plugin", "images=0").samples_per_plugin == {"images": 0,
                                                                                               "text": every}


@pytest.mark.parametrize("run", ["run_a", "run_b"])
@pytest.mark.parametrize("tag", [GRADCAM_0, FEATURES_10, KERNELS, CHANNEL_MEANS])
@pytest.mark.parametrize("step", [STEPS[0], STEPS[7], STEPS[-1]])
def test_image_is_the_png_that_was_written(client, run, tag, step):
    response = client.get(f"{ROUTE}/image", query_string={"run": run, "tag": tag, "step": str(step)})
    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    data = response.get_data()
    assert data == written_png(run, step, tag)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert tuple(pixels[0, 0]) == colour(run, step, tag)


def test_text_returns_the_latest_cnnvis_summaries_only(client):
    answer = get_json(client, "text", run="run_c")
    assert answer["run"] == "run_c"
    assert [(t["tag"], t["step"]) for t in answer["texts"]] == [
        ("cnnvis/summary/model/layers/text_summary", 0)  # SummaryWriter.add_text appends /text_summary
    ]
    assert "| conv1 | Conv2d |" in answer["texts"][0]["text"]
    assert get_json(client, "text", run="run_a") == {
        "run": "run_a",
        "texts": [{"tag": "cnnvis/summary/model/kinds/text_summary", "step": 0, "text": KINDS_TABLE_A}],
    }
    assert get_json(client, "text", run="unrelated") == {"run": "unrelated", "texts": []}


def error_of(response) -> str:
    assert response.mimetype == "application/json", response.get_data(as_text=True)
    message = json.loads(response.get_data())["error"]
    assert isinstance(message, str) and message
    return message


GOOD_IMAGE_QUERY = {"run": "run_a", "tag": GRADCAM_0, "step": "4"}
BAD_IMAGE_QUERIES = [
    # missing or empty
    ({"run": None}, 400),
    ({"tag": None}, 400),
    ({"step": None}, 400),
    ({"run": ""}, 400),
    ({"step": ""}, 400),
    # steps that are not non-negative ASCII integers within int64
    ({"step": "-1"}, 400),
    ({"step": "-0"}, 400),
    ({"step": "+4"}, 400),
    ({"step": "4.0"}, 400),
    ({"step": "1e3"}, 400),
    ({"step": "0x1f"}, 400),
    ({"step": " 4"}, 400),
    ({"step": "NaN"}, 400),
    ({"step": "\uff14"}, 400),  # full-width 4: int() would accept it
    ({"step": "\u0664"}, 400),  # Arabic-Indic 4
    ({"step": str(2**63)}, 400),
    ({"step": "9" * 5000}, 400),
    # well-formed, but not logged
    ({"step": "5"}, 404),
    ({"step": str(2**63 - 1)}, 404),
    ({"run": "nope"}, 404),
    ({"run": "unrelated"}, 404),
    ({"run": "../run_a"}, 404),
    ({"run": "run_a/../run_b"}, 404),
    ({"run": "/etc"}, 404),
    ({"run": "run_a\x00"}, 404),
    ({"run": "\u30e9\u30f3\U0001f642"}, 404),
    ({"run": "<img src=x onerror=alert(1)>"}, 404),
    ({"run": "r" * 5000}, 400),
    # tags that are not cnnvis image tags
    ({"tag": "../../../../etc/passwd"}, 400),
    ({"tag": "..%2F..%2Fetc%2Fpasswd"}, 400),
    ({"tag": "photos/cat"}, 400),
    ({"tag": "cnnvis/gradcam/layer4"}, 400),
    ({"tag": "cnnvis/summary/model/layers"}, 400),
    ({"tag": "cnnvis/summary/model/kinds"}, 400),
    ({"tag": "cnnvis/metrics/gradcam/layer4/energy"}, 400),
    ({"tag": "cnnvis/-kind/layer4/probe_000"}, 400),
    ({"tag": "cnnvis/my kind/layer4/probe_000"}, 400),
    ({"tag": "cnnvis/<b>/layer4/probe_000"}, 400),
    ({"tag": "cnnvis//layer4/probe_000"}, 400),
    ({"tag": f"cnnvis/{'k' * 65}/layer4/probe_000"}, 400),
    ({"tag": "t" * 5000}, 400),
    # well-formed cnnvis tags that hold nothing: any kind name may hold images, none is refused by name
    ({"tag": "cnnvis/gradcam/layer9/probe_000"}, 404),
    ({"tag": "cnnvis/nope/layer4/probe_000"}, 404),
    ({"tag": f"cnnvis/{'k' * 64}/layer4/probe_000"}, 404),
    ({"tag": "cnnvis/histograms/conv1/weight"}, 404),  # a histogram, not an image
    ({"tag": "cnnvis/gradcam/../../../etc/passwd"}, 404),
]


@pytest.mark.parametrize(("change", "status"), BAD_IMAGE_QUERIES)
def test_bad_image_arguments_are_client_errors(client, change, status):
    query = {k: v for k, v in {**GOOD_IMAGE_QUERY, **change}.items() if v is not None}
    response = client.get(f"{ROUTE}/image", query_string=query)
    assert response.status_code == status
    error_of(response)


@pytest.mark.parametrize(
    ("route", "query", "status"),
    [
        ("steps", {}, 400),
        ("steps", {"tag": ""}, 400),
        ("steps", {"tag": "photos/cat"}, 400),
        ("steps", {"tag": "cnnvis/gradcam/../probe_000"}, 404),
        ("steps", {"tag": "x" * 10_000}, 400),
        ("text", {}, 400),
        ("text", {"run": "nope"}, 404),
        ("text", {"run": "../../etc"}, 404),
        ("text", {"run": "\U0001f642" * 5000}, 400),
    ],
)
def test_bad_arguments_of_the_json_routes_are_client_errors(client, route, query, status):
    response = client.get(f"{ROUTE}/{route}", query_string=query)
    assert response.status_code == status
    error_of(response)


def test_repeated_arguments_are_refused(client):
    response = client.get(f"{ROUTE}/image", query_string=f"run=run_a&run=run_b&tag={GRADCAM_0}&step=4")
    assert response.status_code == 400
    assert "run" in error_of(response)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../cnnvis_plugin.py",
        "/static/..%2F..%2Fplugin%2Fcnnvis_plugin.py",
        "/static/%2e%2e/%2e%2e/setup.py",
        "/..%2F..%2F..%2Fsetup.py",
        "/static/style.css/../../../../../../etc/passwd",
        "/static/__init__.py",
        "/static/index.js.map",
        "/index.js%00.py",
    ],
)
def test_no_request_path_reaches_the_file_system(client, path):
    response = client.get(ROUTE + path)
    assert response.status_code == 404
    body = response.get_data(as_text=True)
    assert "import" not in body and "root:" not in body


@settings(max_examples=150, deadline=None)
@given(
    run=st.one_of(st.none(), st.sampled_from(["run_a", "run_c"]), st.text(max_size=40)),
    tag=st.one_of(st.none(), st.sampled_from(IMAGE_TAGS), st.text(max_size=60)),
    step=st.one_of(st.none(), st.integers(-(2**70), 2**70).map(str), st.text(max_size=30)),
)
def test_image_route_never_fails_on_any_query(client, run, tag, step):
    query = {k: v for k, v in {"run": run, "tag": tag, "step": step}.items() if v is not None}
    response = client.get(f"{ROUTE}/image", query_string=query)
    if response.status_code == 200:
        assert response.mimetype == "image/png"
        assert query["tag"] in IMAGE_TAGS and int(query["step"]) in STEPS
    else:
        assert response.status_code in (400, 404)
        error_of(response)


def test_static_files_come_from_the_whitelist(client):
    frontend = importlib.resources.files("cnnvis_tb.frontend")
    shipped = {entry.name for entry in frontend.iterdir() if entry.name.endswith((".js", ".css"))}
    assert shipped == {filename for filename, _ in cnnvis_plugin.STATIC_FILES.values()}
    for route, (filename, content_type) in cnnvis_plugin.STATIC_FILES.items():
        response = client.get(ROUTE + route)
        assert response.status_code == 200
        assert response.mimetype == content_type
        assert response.get_data() == frontend.joinpath(filename).read_bytes()


def test_index_js_only_exports_render():
    """TensorBoard calls ``render()``; the tab itself lives in the modules index.js imports."""
    source = importlib.resources.files("cnnvis_tb.frontend").joinpath("index.js").read_text()
    exports = [line for line in source.splitlines() if line.startswith("export")]
    assert exports == ["export async function render() {"]


def test_no_kind_is_hard_coded_in_the_plugin():
    """Kinds, labels and their order come from the data (``/index``): neither side names a built-in kind."""
    frontend = importlib.resources.files("cnnvis_tb.frontend")
    sources = {name: frontend.joinpath(name).read_text() for name, _ in cnnvis_plugin.STATIC_FILES.values()}
    plugin_dir = Path(cnnvis_plugin.__file__).parent
    sources |= {path.name: path.read_text() for path in plugin_dir.glob("*.py")}
    for name, source in sources.items():
        for word in ("KIND_LABELS", "Grad-CAM", "Feature maps", "Activation max", "IMAGE_KINDS"):
            assert word not in source, f"{name} names {word!r}"
        for kind in ("gradcam", "features", "kernels", "actmax", "saliency"):
            assert f'"{kind}"' not in source and f"'{kind}'" not in source, f"{name} names the kind {kind!r}"


def test_es_module_imports_only_whitelisted_files():
    """Every relative import of the frontend resolves to a served route (a typo would break the tab)."""
    frontend = importlib.resources.files("cnnvis_tb.frontend")
    served = set(cnnvis_plugin.STATIC_FILES)
    for route, (filename, _) in cnnvis_plugin.STATIC_FILES.items():
        if not filename.endswith(".js"):
            continue
        source = frontend.joinpath(filename).read_text()
        base = route.rsplit("/", 1)[0]
        for line in source.splitlines():
            if line.startswith("import ") and " from " in line:
                target = line.rsplit(" from ", 1)[1].strip(' ";')
                assert target.startswith("./"), line
                assert f"{base}/{target[2:]}" in served, f"{filename}: {line}"


def test_plugin_metadata_and_activity(logdir, tmp_path):
    served = serve(logdir)
    client, plugin = served.client, served.plugin
    assert plugin.plugin_name == "cnnvis"
    assert plugin.frontend_metadata() == base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="CNN Vis")
    assert plugin.is_active()
    listing = json.loads(client.get("/data/plugins_listing").get_data())
    assert listing["cnnvis"]["enabled"] is True
    assert listing["cnnvis"]["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{ROUTE}/index.js"}

    with SummaryWriter(tmp_path / "photos") as writer:  # images, but none of ours
        writer.add_image("photos/cat", np.zeros((3, 4, 4), np.uint8), 0)
    served = serve(tmp_path)
    client, plugin = served.client, served.plugin
    assert not plugin.is_active()
    assert json.loads(client.get("/data/plugins_listing").get_data())["cnnvis"]["enabled"] is False
    assert get_json(client, "index") == {"runs": [], "kinds": []}


def test_vislogger_output_reads_back_through_the_plugin(tmp_path):
    import torch
    from _models import TinyCNN, make_batch, read_events

    from cnnvis_tb import VisLogger

    torch.manual_seed(0)
    model = TinyCNN()
    probe, labels = make_batch(3, n=2)
    with VisLogger(
        model, tmp_path / "tiny", probe=probe, probe_labels=labels, every=1, kinds=("kernels", "gradcam"), strict=True
    ) as vis:
        for step in range(3):
            vis.step(step)
    client = serve(tmp_path).client
    index = get_json(client, "index")
    assert index["runs"] == ["tiny"]
    # Order and labels as the run's kinds table (read back by TensorBoard's own loader) says, when the
    # logger writes one; by name otherwise.
    events = read_events(tmp_path / "tiny")
    table_tag = metadata.KINDS_TABLE_TAGS[0]
    table = (
        tags.parse_kinds_table(events.Tensors(table_tag)[-1].tensor_proto.string_val[0].decode())
        if table_tag in events.Tags()["tensors"]
        else []
    )
    listed = [info for info in table if info.name in ("gradcam", "kernels")]
    expected = listed + [
        tags.KindInfo(name, name) for name in ("gradcam", "kernels") if name not in {i.name for i in listed}
    ]
    assert [(k["kind"], k["label"]) for k in index["kinds"]] == [tuple(info) for info in expected]
    gradcam_views = next(k for k in index["kinds"] if k["kind"] == "gradcam")["layers"][0]["views"]
    assert [v["probe"] for v in gradcam_views] == [0, 1]
    tag = gradcam_views[1]["tag"]
    answer = get_json(client, "steps", tag=tag)
    assert answer["runs"] == [{"run": "tiny", "steps": [0, 1, 2]}]
    response = client.get(f"{ROUTE}/image", query_string={"run": "tiny", "tag": tag, "step": "2"})
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.get_data())).size == (answer["width"], answer["height"])


def test_plugin_side_imports_no_torch(logdir):
    """TensorBoard loads the plugin and serves every route without importing torch or torchvision."""
    script = f"""
import sys
from cnnvis_tb.plugin.loader import CnnVisLoader
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug import test, wrappers
multiplexer = plugin_event_multiplexer.EventMultiplexer()
multiplexer.AddRunsFromDirectory({str(logdir)!r})
multiplexer.Reload()
provider = data_provider.MultiplexerDataProvider(multiplexer, {str(logdir)!r})
plugin = CnnVisLoader().load(base_plugin.TBContext(data_provider=provider))
assert plugin.is_active()
client = test.Client(application.TensorBoardWSGI([plugin]), wrappers.Response)
for query in ("index", "steps?tag={CHANNEL_MEANS}", "image?run=run_a&tag={CHANNEL_MEANS}&step=0", "text?run=run_a", "index.js"):
    response = client.get("{ROUTE}/" + query)
    assert response.status_code == 200, (query, response.get_data())
assert "Channel means" in client.get("{ROUTE}/index").get_data(as_text=True)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
"""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert {f"cnnvis_tb.plugin.{name}" for name in ("cnnvis_plugin", "args", "images", "index", "texts")} <= imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision")}


@pytest.fixture(scope="module")
def metrics_logdir(tmp_path_factory) -> Path:
    """Metric scalars of two runs (one rewrites a step, one logs a NaN), plus scalars the route must ignore."""
    root = tmp_path_factory.mktemp("metrics")
    pointing = tags.metric_tag("gradcam", "layer4", "pointing/gradcam++/true")
    per_image = tags.metric_tag("gradcam", "layer4", "pointing/gradcam/true/probe_010")
    with SummaryWriter(root / "run_10") as writer:
        for step in (0, 5, 10):
            writer.add_scalar(pointing, step / 10, step)
        writer.add_scalar(pointing, 0.75, 5)  # a restarted run rewrote step 5: its last value counts
        writer.add_scalar(tags.metric_tag("health", "probe", "accuracy"), float("nan"), 0)
        writer.add_scalar("train/loss", 1.0, 0)
        writer.add_scalar("cnnvis/metrics/summary/x/y", 1.0, 0)  # a reserved name is no kind: ignored
    with SummaryWriter(root / "run_9") as writer:
        writer.add_scalar(pointing, 0.5, 0)
        writer.add_scalar(per_image, 1.0, 0)
        writer.add_scalar(tags.metric_tag("health", "probe", "accuracy"), 0.25, 0)
        writer.add_scalar(tags.metric_tag("gradcam", "layer4", "entropy/gradcam++/true"), 0.9, 0)
    return root


def test_metrics_lists_every_cnnvis_scalar_of_every_run(metrics_logdir):
    answer = get_json(serve(metrics_logdir).client, "metrics")
    assert answer["runs"] == ["run_9", "run_10"]
    by_tag = {s["tag"]: s for s in answer["series"]}
    # kind, layer, then metric in METRIC_ORDER (pointing before entropy), then name
    assert list(by_tag) == [
        "cnnvis/metrics/gradcam/layer4/pointing/gradcam++/true",
        "cnnvis/metrics/gradcam/layer4/pointing/gradcam/true/probe_010",
        "cnnvis/metrics/gradcam/layer4/entropy/gradcam++/true",
        "cnnvis/metrics/health/probe/accuracy",
    ]
    pointing = by_tag["cnnvis/metrics/gradcam/layer4/pointing/gradcam++/true"]
    assert (pointing["kind"], pointing["layer"], pointing["metric"]) == ("gradcam", "layer4", "pointing")
    assert pointing["variant"] == {"method": "gradcam++", "target": "true"}
    assert pointing["runs"] == [
        {"run": "run_9", "steps": [0], "values": [0.5]},
        {"run": "run_10", "steps": [0, 5, 10], "values": [0.0, 0.75, 1.0]},
    ]
    per_image = by_tag["cnnvis/metrics/gradcam/layer4/pointing/gradcam/true/probe_010"]
    assert per_image["variant"] == {"method": "gradcam", "target": "true", "image": "probe_010"}
    accuracy = {r["run"]: r["values"] for r in by_tag["cnnvis/metrics/health/probe/accuracy"]["runs"]}
    assert accuracy == {"run_9": [0.25], "run_10": [None]}  # NaN is no JSON: null


def test_metrics_of_a_logdir_without_metrics_is_empty(logdir):
    assert get_json(serve(logdir).client, "metrics") == {"runs": [], "series": []}
