"""The plugin inside a real ``tensorboard`` process, over HTTP.

Both data loaders (the Rust data server, TensorBoard's default, and ``--load_fast=false``) serve the
demo's runs plus a run of 15 logged steps, more than the 10 TensorBoard keeps by default, which also
holds a user's own kind and a kinds table that labels it (and relabels saliency).
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import tags

LONG_TAG = tags.image_tag("saliency", "input", tags.probe_view(0))
LONG_STEPS = list(range(15))
#: A user's own kind, logged by the long run at a few steps.
CUSTOM_TAG = tags.image_tag("channel_means", "features.3", tags.probe_view(0))
CUSTOM_STEPS = [0, 7, 14]
#: The long run's kinds table; "long" comes before the demo runs, so its labels and order win.
LONG_KINDS = [("channel_means", "Channel means"), ("saliency", "Saliency (long run)")]
#: Steps the demo logs with the fixture's ``--steps 6 --every 3``: 0 and 3, and the final state at 6.
DEMO_LOGGED_STEPS = [0, 3, 6]


def fetch(url: str) -> tuple[int, str, bytes]:
    """Status, media type and body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


def fetch_json(url: str) -> object:
    status, media_type, body = fetch(url)
    assert (status, media_type) == (200, "application/json"), body
    return json.loads(body)


def plugin_url(server: str, route: str, **query: str) -> str:
    return f"{server}/data/plugin/cnnvis/{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")


@pytest.fixture(scope="module")
def logdir(demo_logdir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    for run in demo_logdir.iterdir():
        shutil.copytree(run, root / run.name)
    with SummaryWriter(root / "long") as writer:
        writer.add_text(tags.KINDS_TABLE_TAG, tags.kinds_table([(kind, label, "") for kind, label in LONG_KINDS]), 0)
        for step in LONG_STEPS:
            writer.add_image(LONG_TAG, np.full((3, 5, 5), step * 10, np.uint8), step)
            if step in CUSTOM_STEPS:
                writer.add_image(CUSTOM_TAG, np.full((3, 4, 6), step, np.uint8), step)
    return root


@pytest.fixture(scope="module")
def demo_runs(demo_logdir) -> list[str]:
    return sorted(run.name for run in demo_logdir.iterdir())


def fully_indexed(index: dict, demo_runs: list[str]) -> bool:
    """Whether every run is listed, each demo view lists every demo run and the long run's table is read.

    TensorBoard loads runs one by one, in the background.
    """
    views = [view for kind in index["kinds"] for layer in kind["layers"] for view in layer["views"]]
    labels = [(kind["kind"], kind["label"]) for kind in index["kinds"]]
    return (
        index["runs"] == sorted(["long", *demo_runs])
        and all(view["runs"] == demo_runs for view in views if view["tag"] not in (LONG_TAG, CUSTOM_TAG))
        and labels[: len(LONG_KINDS)] == LONG_KINDS
    )


@pytest.fixture(scope="module", params=["rust data server", "--load_fast=false"])
def server(request, logdir, demo_runs, start_tensorboard, wait_for_json) -> str:
    fast = request.param == "rust data server"
    tensorboard = start_tensorboard(logdir, *(() if fast else ("--load_fast=false",)), plugin="cnnvis")
    # Make sure each case runs the loader it claims to (TensorBoard silently falls back otherwise).
    assert ("fast data loading" in tensorboard.log.read_text()) == fast
    wait_for_json(plugin_url(tensorboard.url, "index"), lambda index: fully_indexed(index, demo_runs))
    return tensorboard.url


def test_plugins_listing_enables_the_tab(server):
    listing = fetch_json(f"{server}/data/plugins_listing")
    assert listing["cnnvis"]["enabled"] is True
    assert listing["cnnvis"]["tab_name"] == "CNN Vis"
    assert listing["cnnvis"]["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/cnnvis/index.js"}


def test_index_lists_the_runs_and_the_demo_kinds(server, demo_runs):
    index = fetch_json(plugin_url(server, "index"))
    assert index["runs"] == sorted(["long", *demo_runs])
    kinds = {k["kind"]: k for k in index["kinds"]}
    assert {"gradcam", "features", "kernels", "actmax", "saliency"} <= set(kinds)
    for kind in ("gradcam", "features", "kernels", "actmax"):
        for layer in kinds[kind]["layers"]:
            for view in layer["views"]:
                assert view["runs"] == demo_runs
                assert view["tag"] == tags.image_tag(kind, layer["layer"], view["view"])
    assert kinds["saliency"]["layers"] == [
        {"layer": "input", "views": [{"view": "probe_000", "probe": 0, "tag": LONG_TAG, "runs": ["long"]}]}
    ]


def test_index_labels_a_users_kind_from_its_kinds_table(server):
    """The kinds table, a text summary, reaches the plugin through either loader: labels and order from it."""
    index = fetch_json(plugin_url(server, "index"))
    assert [(kind["kind"], kind["label"]) for kind in index["kinds"]][: len(LONG_KINDS)] == LONG_KINDS
    assert index["kinds"][0]["layers"] == [
        {"layer": "features.3", "views": [{"view": "probe_000", "probe": 0, "tag": CUSTOM_TAG, "runs": ["long"]}]}
    ]
    assert all(isinstance(kind["label"], str) and kind["label"] for kind in index["kinds"])
    answer = fetch_json(plugin_url(server, "steps", tag=CUSTOM_TAG))
    assert answer == {"tag": CUSTOM_TAG, "width": 6, "height": 4, "runs": [{"run": "long", "steps": CUSTOM_STEPS}]}
    status, media_type, body = fetch(plugin_url(server, "image", run="long", tag=CUSTOM_TAG, step="7"))
    assert (status, media_type) == (200, "image/png"), body[:200]
    image = Image.open(io.BytesIO(body)).convert("RGB")
    assert image.size == (6, 4) and image.getpixel((0, 0)) == (7, 7, 7)


def test_every_logged_step_is_served(server, demo_runs, wait_for_json):
    """All 15 steps of the long run, and every step the demo logged for every tag (once loaded)."""
    long_run = [{"run": "long", "steps": LONG_STEPS}]
    url = plugin_url(server, "steps", tag=LONG_TAG)
    wait_for_json(url, lambda answer: answer["runs"] == long_run, timeout=30, settle=False)
    index = fetch_json(plugin_url(server, "index"))
    for kind in index["kinds"]:
        # The schedule starts activation maximization at its interval, not at step 0.
        steps = [s for s in DEMO_LOGGED_STEPS if s or kind["kind"] != "actmax"]
        expected = [{"run": run, "steps": steps} for run in demo_runs]
        for layer in kind["layers"]:
            for view in layer["views"]:
                if view["tag"] not in (LONG_TAG, CUSTOM_TAG):
                    url = plugin_url(server, "steps", tag=view["tag"])
                    wait_for_json(
                        url, lambda answer, expected=expected: answer["runs"] == expected, timeout=30, settle=False
                    )


def test_images_are_pngs_of_the_announced_size(server, demo_runs):
    index = fetch_json(plugin_url(server, "index"))
    for kind in index["kinds"]:
        tag = kind["layers"][0]["views"][0]["tag"]
        answer = fetch_json(plugin_url(server, "steps", tag=tag))
        run, steps = answer["runs"][0]["run"], answer["runs"][0]["steps"]
        status, media_type, body = fetch(plugin_url(server, "image", run=run, tag=tag, step=str(steps[-1])))
        assert (status, media_type) == (200, "image/png"), body[:200]
        assert Image.open(io.BytesIO(body)).size == (answer["width"], answer["height"])


@pytest.mark.parametrize(
    ("route", "query", "status"),
    [
        ("image", {"run": "long", "tag": LONG_TAG, "step": "-1"}, 400),
        ("image", {"run": "long", "tag": LONG_TAG, "step": "99999999999999999999999"}, 400),
        ("image", {"run": "long", "tag": LONG_TAG, "step": "15"}, 404),
        ("image", {"run": "nope", "tag": LONG_TAG, "step": "1"}, 404),
        ("image", {"run": "long", "tag": "../../../etc/passwd", "step": "1"}, 400),
        ("image", {"run": "long", "tag": LONG_TAG}, 400),
        ("steps", {"tag": "cnnvis/gradcam/nope/probe_000"}, 404),
        ("text", {"run": "\u00e9t\u00e9 \U0001f642"}, 404),
    ],
)
def test_bad_arguments_answer_json_client_errors(server, route, query, status):
    got_status, media_type, body = fetch(plugin_url(server, route, **query))
    assert (got_status, media_type) == (status, "application/json"), body
    assert json.loads(body)["error"]


@pytest.mark.parametrize(
    "path", ["static/..%2F..%2Fsetup.py", "static/%2e%2e/cnnvis_plugin.py", "index.js%2F..%2F..%2F"]
)
def test_encoded_traversal_finds_nothing(server, path):
    status, _, body = fetch(f"{server}/data/plugin/cnnvis/{path}")
    assert status == 404
    assert b"import" not in body


def test_the_tab_entry_page_loads_our_module_under_a_strict_policy(server):
    with urllib.request.urlopen(f"{server}/data/plugin_entry.html?name=cnnvis", timeout=30) as response:
        policy = response.headers["Content-Security-Policy"]
        page = response.read().decode()
    assert '<base href="plugin/cnnvis/"' in page and "./index.js" in page
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src", 1)[1]
    status, media_type, body = fetch(plugin_url(server, "index.js"))
    assert (status, media_type) == (200, "text/javascript")
    assert b"export async function render()" in body


def test_routes_work_under_a_path_prefix(logdir, start_tensorboard, wait_for_json):
    server = start_tensorboard(logdir, "--path_prefix", "/board", plugin="cnnvis", prefix="/board").url
    wait_for_json(
        plugin_url(server, "steps", tag=LONG_TAG), lambda answer: len(answer["runs"][0]["steps"]) == 15, settle=False
    )
    assert fetch_json(plugin_url(server, "steps", tag=LONG_TAG))["runs"][0]["steps"] == LONG_STEPS
    status, media_type, _ = fetch(plugin_url(server, "image", run="long", tag=LONG_TAG, step="14"))
    assert (status, media_type) == (200, "image/png")
    assert fetch(server.removesuffix("/board") + "/data/plugin/cnnvis/index")[0] == 404
