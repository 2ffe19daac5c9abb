"""The "CNN Vis" plugin's routes, in process: event files -> TensorBoard's data provider -> WSGI.

Events are written with the stock ``SummaryWriter.add_image`` under the tag scheme of
``cnnvis_tb.tags``; every image has one colour that encodes its run, step and tag, so an answer can
be traced back to what was written.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester, data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.core import core_plugin
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import image as image_summary
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

from cnnvis_tb import tags
from cnnvis_tb.plugin import cnnvis_plugin, metadata
from cnnvis_tb.plugin.loader import CnnVisLoader

ROUTE = "/data/plugin/cnnvis"

GRADCAM_0 = tags.image_tag("gradcam", "layer4", tags.probe_view(0))
GRADCAM_1 = tags.image_tag("gradcam", "layer4", tags.probe_view(1))
FEATURES_3 = tags.image_tag("features", "features.3", tags.probe_view(0))
FEATURES_10 = tags.image_tag("features", "features.10", tags.probe_view(0))
KERNELS = tags.image_tag("kernels", "conv1", "grid")
ACTMAX = tags.image_tag("actmax", "features.3", "channels")
IMAGE_TAGS = (GRADCAM_1, FEATURES_10, KERNELS, GRADCAM_0, ACTMAX, FEATURES_3)  # written out of order
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
    for run in FULL_RUNS:
        with SummaryWriter(root / run) as writer:
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
                "kind": "gradcam",
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
                "layers": [
                    {"layer": "conv1", "views": [{"view": "grid", "probe": None, "tag": KERNELS, "runs": everyone}]}
                ],
            },
            {
                "kind": "actmax",
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
    with SummaryWriter(tmp_path / "run_a") as writer:
        writer.add_image(GRADCAM_0, picture("run_a", 4, GRADCAM_0), 4)
    served.multiplexer.AddRunsFromDirectory(str(tmp_path))
    served.multiplexer.Reload()
    assert steps() == [0, 2, 4]
    assert len(reads) == 2


def test_steps_cache_keeps_the_latest_version_of_the_most_recent_keys():
    cache = cnnvis_plugin.StepsCache(2)
    cache.put("a", 1, "answer a1")
    cache.put("b", 1, "answer b1")
    assert cache.get("a", 1) == "answer a1"  # a is now the most recent
    assert cache.get("a", 2) is None
    cache.put("c", 1, "answer c1")  # evicts b
    assert (cache.get("a", 1), cache.get("b", 1), cache.get("c", 1)) == ("answer a1", None, "answer c1")
    cache.put("a", 2, "answer a2")
    assert (cache.get("a", 1), cache.get("a", 2)) == (None, "answer a2")


def test_an_explicit_samples_per_plugin_wins(logdir):
    flags = tensorboard_flags(logdir, "--samples_per_plugin", "images=3,scalars=7")
    assert flags.samples_per_plugin == {"images": 3, "scalars": 7}
    limited = serve(logdir, "--samples_per_plugin", "images=3").client
    assert [len(r["steps"]) for r in get_json(limited, "steps", tag=KERNELS)["runs"]] == [3, 3]


def test_loader_defaults_images_to_all_steps(logdir):
    assert tensorboard_flags(logdir).samples_per_plugin == {"images": metadata.ALL_STEPS}
    assert tensorboard_flags(logdir, fix=False).samples_per_plugin == {}
    assert tensorboard_flags(logdir, "--samples_per_plugin", "images=0").samples_per_plugin == {"images": 0}


@pytest.mark.parametrize("run", ["run_a", "run_b"])
@pytest.mark.parametrize("tag", [GRADCAM_0, FEATURES_10, KERNELS])
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
    assert get_json(client, "text", run="run_a") == {"run": "run_a", "texts": []}


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
    ({"tag": "cnnvis/histograms/conv1/weight"}, 400),
    ({"tag": "cnnvis/summary/model/layers"}, 400),
    ({"tag": "cnnvis/nope/layer4/probe_000"}, 400),
    ({"tag": "t" * 5000}, 400),
    # well-formed cnnvis tags that hold nothing
    ({"tag": "cnnvis/gradcam/layer9/probe_000"}, 404),
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
    from _models import TinyCNN, make_batch

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
    assert [k["kind"] for k in index["kinds"]] == ["gradcam", "kernels"]
    gradcam_views = index["kinds"][0]["layers"][0]["views"]
    assert [v["probe"] for v in gradcam_views] == [0, 1]
    tag = gradcam_views[1]["tag"]
    answer = get_json(client, "steps", tag=tag)
    assert answer["runs"] == [{"run": "tiny", "steps": [0, 1, 2]}]
    response = client.get(f"{ROUTE}/image", query_string={"run": "tiny", "tag": tag, "step": "2"})
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.get_data())).size == (answer["width"], answer["height"])


def test_plugin_side_imports_no_torch(logdir):
    """TensorBoard loads the plugin (and serves a request) without importing torch or torchvision."""
    script = f"""
import sys
from cnnvis_tb.plugin.loader import CnnVisLoader
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard import context
multiplexer = plugin_event_multiplexer.EventMultiplexer()
multiplexer.AddRunsFromDirectory({str(logdir)!r})
multiplexer.Reload()
provider = data_provider.MultiplexerDataProvider(multiplexer, {str(logdir)!r})
plugin = CnnVisLoader().load(base_plugin.TBContext(data_provider=provider))
assert plugin.is_active()
plugin.get_plugin_apps()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
"""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "cnnvis_tb.plugin.cnnvis_plugin" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision")}
