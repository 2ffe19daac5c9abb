"""Hostile data in the "CNN Vis" tab: markup in run, layer and class names, broken event files, an empty logdir.

One logdir, written by `VisLogger` for a model whose only convolution is named like markup and whose
class names are markup, holds:

* ``good``: the logger's events file, next to a file of pure garbage and an empty events file;
* ``"><svg onload=alert(1)>``: a copy of the good events file under a run name that is markup;
* ``truncated``: the good file cut at 60 % of its bytes, amid a record;
* ``flipped``: the good file with 64 random bytes amid the PNG of the first image past its middle;
* ``garbage`` and ``empty``: nothing but a garbage file, nothing but an empty events file;
* ``!kinds``: no image, only a kinds table (first in run order, so it labels the kinds) with markup in
  its labels, an escaped and an unescaped ``|``, a label far too long for a button and rows that do
  not parse.

Its routes are read in process (WSGI over TensorBoard's Python data provider) and from the real
``tensorboard`` program with both loaders; the tab is driven in Chromium on both servers, and on a
server of an empty folder. Browser cases skip when Playwright or Chromium is missing, except under
``CI=true`` where that fails.

Two limits of the Rust data server (TensorBoard's default loader) shape what is expected:

* it cannot read back any image of a run whose name holds a ``"`` or a ``\\``: it hands out blob keys
  it then fails to parse ("failed to parse blob key: BadJson"). Those images answer a JSON 400;
  everything else must keep working around them.
* it checksums a record only when the record fails to parse (its ``--no-checksum`` default), so the
  damaged image of ``flipped`` is served as read, garbage included, where the Python loader stops
  reading the file at that record.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from _models import make_batch, read_events
from PIL import Image
from tensorboard import errors
from tensorboard.backend.event_processing import data_provider
from tensorboard.compat.proto import event_pb2
from test_plugin_backend import ROUTE, serve
from test_plugin_browser import ALL_IMAGES_SETTLED, FRAME, VIEWPORT, Tab
from test_plugin_server import fetch, plugin_url
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import VisLogger, tags

#: The model's one convolution, inside an nn.ModuleDict under this key.
LAYER_KEY = "<img src=x onerror=alert(1)>"
LAYER = f"blocks.{LAYER_KEY}"
#: The layer part of its tags: the tag scheme only replaces '/' and whitespace.
LAYER_PART = "blocks.<img_src=x_onerror=alert(1)>"
CLASS_NAMES = ("<script>alert(1)</script>", '"><svg onload=alert(2)>', "&amp;<b>cat</b>")
SVG_RUN = '"><svg onload=alert(1)>'
GOOD, TRUNCATED, FLIPPED = "good", "truncated", "flipped"
#: Runs holding cnnvis images, in the tab's (natural) order.
IMAGE_RUNS = sorted([SVG_RUN, GOOD, TRUNCATED, FLIPPED])
LOGGED_STEPS = [0, 1, 2]
LOADERS = ("rust data server", "--load_fast=false")
#: A run holding only a kinds table; "!" sorts before every other run name here, so its labels win.
LABELS_RUN = "!kinds"
MARKUP_LABEL = "<img src=x onerror=alert(3)>"
BAR_LABEL = "Feature | maps & <b>more</b>"
LONG_LABEL = "<i>" * 1000
HOSTILE_KINDS_TABLE = "\n".join(
    [
        # Written as the logger writes it: the '|' in BAR_LABEL is escaped.
        tags.kinds_table([("gradcam", MARKUP_LABEL, "markup in a label"), ("features", BAR_LABEL, "a bar")]),
        # And by hand: rows that do not parse, or list a kind again, change nothing.
        "| not a kind! | ignored | no kind has this name |",
        "| metrics | reserved | not a kind |",
        "| <script>alert(4)</script> | x | markup as a kind name |",
        "| kernels |",
        "no table row at all",
        "| features | second label | a kind listed twice keeps its first label |",
        "| kernels | raw | bar | an unescaped bar ends the label |",
        f"| actmax | {LONG_LABEL} | a label too long for a button |",
    ]
)
#: What /index makes of it: (kind, label), in the table's order.
HOSTILE_KINDS = [
    ("gradcam", MARKUP_LABEL),
    ("features", BAR_LABEL),
    ("kernels", "raw"),
    ("actmax", LONG_LABEL[:79] + "…"),
]
#: Elements the tab creates inside <body>; markup parsed from data would add others (or an img with src=x).
TAB_ELEMENTS = {
    "button", "details", "div", "figcaption", "figure", "h2", "header", "img", "input", "label", "li",
    "main", "ol", "option", "p", "pre", "section", "select", "span", "strong", "summary", "table", "tbody", "td",
    "th", "thead", "tr",
}  # fmt: skip
EVERY_SLOT_HAS_ITS_IMAGE = """() => {
    const slots = document.querySelectorAll('.cv-thumb');
    return slots.length > 0 && [...slots].every((slot) => slot.querySelector('img'));
}"""
#: Resolves once the error handler of every image that failed has marked its cell.
IMAGES_SETTLED_AS_CELLS = """() => [...document.querySelectorAll('.cv-thumb img')].every(
    (image) => image.complete && (image.naturalWidth > 0 || image.parentElement.classList.contains('cv-failed'))
)"""
IMAGE_STATES = """images => images.map((image) => ({
    run: image.parentElement.dataset.run,
    step: Number(image.parentElement.dataset.step),
    width: image.naturalWidth,
    failed: image.parentElement.classList.contains('cv-failed'),
}))"""
#: What the frame holds beyond the tab's own elements: elements in its <body> not in TAB_ELEMENTS
#: (TensorBoard's entry page adds one module script there), and every script, svg, iframe, object or
#: embed, and img with a source other than the plugin's image route, anywhere in the frame. The trends
#: charts are the one svg allowed: class cv-trend-svg, made of the chart's own parts, no event attribute.
FOREIGN_ELEMENTS = """(allowed) => {
    const entry = (e) => e.localName === 'script' && e.type === 'module' && e.text.startsWith('import("./index.js")');
    const parts = ['svg', 'g', 'line', 'text', 'path', 'circle'];
    const chart = (e) => {
        const root = e.closest('svg.cv-trend-svg');
        return !!root && [root, ...root.querySelectorAll('*')].every((n) =>
            parts.includes(n.localName) && ![...n.attributes].some((a) => a.name.toLowerCase().startsWith('on')));
    };
    const odd = [...document.body.querySelectorAll('*')].filter((e) =>
        !allowed.includes(e.localName) && !entry(e) && !chart(e));
    const risky = [...document.querySelectorAll('script, svg, iframe, object, embed, img[src]')].filter((e) =>
        e.localName === 'img' ? !e.src.includes('/data/plugin/cnnvis/image?') : !entry(e) && !chart(e)
    );
    return [...new Set([...odd, ...risky])].map((e) => e.outerHTML);
}"""


class MarkupCNN(nn.Module):
    """One convolution, named like markup, then global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({LAYER_KEY: nn.Conv2d(3, 4, 3, padding=1)})
        self.head = nn.Linear(4, len(CLASS_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.blocks[LAYER_KEY](x)).mean(dim=(2, 3)))


class ImageRecord(NamedTuple):
    offset: int  #: where the record starts in the events file
    tag: str
    step: int
    image: slice  #: where its encoded image lies in the events file


def image_records(data: bytes) -> Iterator[ImageRecord]:
    """The cnnvis images of an events file, over the records that lie wholly inside ``data``."""
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4  # length, its CRC, the record, its CRC
        if end > len(data):
            break
        payload = data[offset + 12 : offset + 12 + length]
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
            if value.HasField("image") and tags.parse_tag(value.tag):
                start = offset + 12 + payload.index(value.image.encoded_image_string)
                yield ImageRecord(
                    offset, value.tag, event.step, slice(start, start + len(value.image.encoded_image_string))
                )
        offset = end


def image_steps(data: bytes) -> dict[str, set[int]]:
    """cnnvis image tag -> steps, over the records of an events file that lie wholly inside ``data``."""
    found: dict[str, set[int]] = {}
    for record in image_records(data):
        found.setdefault(record.tag, set()).add(record.step)
    return found


@dataclass(frozen=True)
class Hostile:
    root: Path
    tags: list[str]  #: every cnnvis image tag of the good run
    truncated: dict[str, list[int]]  #: tag -> the steps whose records end before the cut
    flipped_intact: dict[str, set[int]]  #: tag -> the steps whose records end before the garbage
    damaged: tuple[str, int]  #: tag and step of the image holding the garbage
    layer_table: str  #: the text the logger wrote


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Hostile:
    """The logdir described in the module docstring, and what its files hold."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    probe, labels = make_batch(0, n=2, classes=len(CLASS_NAMES))
    with VisLogger(
        MarkupCNN(),
        root / GOOD,
        probe=probe,
        probe_labels=labels,
        class_names=CLASS_NAMES,
        every=1,
        strict=True,
        actmax_steps=2,
    ) as vis:
        for step in LOGGED_STEPS:
            vis.log_now(step)  # every kind at every step
    (events,) = (root / GOOD).iterdir()
    data = events.read_bytes()
    table_tag = tags.text_tag("model", "layers") + "/text_summary"
    layer_table = read_events(root / GOOD).Tensors(table_tag)[-1].tensor_proto.string_val[0].decode()

    rng = random.Random(0)
    garbage = bytes(rng.randrange(256) for _ in range(4096))
    # Sorting before the good file: TensorBoard's Python loader reads a run's files in name order.
    (root / GOOD / "events.out.tfevents.123.host").write_bytes(garbage)
    (root / GOOD / "events.out.tfevents.124.host").write_bytes(b"")
    (root / SVG_RUN).mkdir()
    shutil.copy(events, root / SVG_RUN / events.name)
    cut = int(len(data) * 0.6)
    (root / TRUNCATED).mkdir()
    (root / TRUNCATED / events.name).write_bytes(data[:cut])
    # Garbage amid the PNG of the first image recorded past the middle of the file: its record still
    # parses, only its checksum tells (the Rust data server skips checksums of records that parse).
    damaged = next(record for record in image_records(data) if record.offset >= len(data) // 2)
    garbage_at = (damaged.image.start + damaged.image.stop) // 2 - 32
    (root / FLIPPED).mkdir()
    (root / FLIPPED / events.name).write_bytes(data[:garbage_at] + rng.randbytes(64) + data[garbage_at + 64 :])
    for run, content in (("garbage", garbage), ("empty", b"")):
        (root / run).mkdir()
        (root / run / "events.out.tfevents.125.host").write_bytes(content)
    with SummaryWriter(root / LABELS_RUN) as writer:
        writer.add_text(tags.KINDS_TABLE_TAG, HOSTILE_KINDS_TABLE, 0)

    written = image_steps(data)
    truncated = image_steps(data[:cut])
    flipped_intact = image_steps(data[: damaged.offset])
    assert sorted(written.values()) == [set(LOGGED_STEPS)] * len(written)
    assert truncated and truncated != written, "the cut must fall between the first and the last image"
    assert all(image_tag.split("/")[2] == LAYER_PART for image_tag in written)
    assert damaged.image.stop - damaged.image.start > 200, "the garbage must land inside the PNG"
    assert flipped_intact.get(damaged.tag), "the flipped run must keep earlier steps of the damaged tag"
    assert {kind for kind, _ in HOSTILE_KINDS} == {tags.parse_tag(tag).kind for tag in written}, (
        "the hostile table must label every kind the logger wrote"
    )
    return Hostile(
        root=root,
        tags=sorted(written),
        truncated={tag: sorted(steps) for tag, steps in truncated.items()},
        flipped_intact=flipped_intact,
        damaged=(damaged.tag, damaged.step),
        layer_table=layer_table,
    )


# The routes, three ways: in process, and from `tensorboard` with each loader.


@dataclass(frozen=True)
class Api:
    name: str
    get: Callable[..., tuple[int, str, bytes]]  #: get(route, **query) -> (status, media type, body)
    url: str | None = None  #: the TensorBoard serving it, if any
    wait_for_json: Callable[..., object] | None = None  #: conftest's, for a TensorBoard still loading

    @property
    def rust(self) -> bool:
        return self.name == LOADERS[0]

    def json(self, route: str, **query: str) -> object:
        status, media_type, body = self.get(route, **query)
        assert (status, media_type) == (200, "application/json"), body[:300]
        return json.loads(body)

    def steps(self, tag: str, done: Callable[[dict], bool]) -> dict:
        """The ``/steps`` answer for ``tag``, which must satisfy ``done`` (TensorBoard gets 30 s to load it)."""
        if self.url is None:
            answer = self.json("steps", tag=tag)
            assert done(answer), answer
            return answer
        return self.wait_for_json(plugin_url(self.url, "steps", tag=tag), done, timeout=30, settle=False)


def every_view_lists_what_it_must(index: dict, hostile: Hostile) -> bool:
    """Whether TensorBoard has loaded all it can (it loads runs one by one)."""
    if index["runs"] != IMAGE_RUNS or [(k["kind"], k["label"]) for k in index["kinds"]] != HOSTILE_KINDS:
        return False
    for view in (view for kind in index["kinds"] for layer in kind["layers"] for view in layer["views"]):
        least = {SVG_RUN, GOOD}
        least |= {TRUNCATED} if view["tag"] in hostile.truncated else set()
        least |= {FLIPPED} if view["tag"] in hostile.flipped_intact else set()
        if not least <= set(view["runs"]):
            return False
    return True


@pytest.fixture(scope="module")
def servers(hostile, start_tensorboard, wait_for_json) -> Callable[[str], str]:
    """``servers(loader)``: the URL of the one TensorBoard over the hostile logdir with that loader."""
    started: dict[str, str] = {}

    def server(loader: str) -> str:
        if loader not in started:
            fast = loader == LOADERS[0]
            tensorboard = start_tensorboard(hostile.root, *(() if fast else ("--load_fast=false",)), plugin="cnnvis")
            assert ("fast data loading" in tensorboard.log.read_text()) == fast
            wait_for_json(
                plugin_url(tensorboard.url, "index"), lambda index: every_view_lists_what_it_must(index, hostile)
            )
            started[loader] = tensorboard.url
        return started[loader]

    return server


@pytest.fixture(scope="module", params=["in process", *LOADERS])
def api(request, hostile, servers, wait_for_json) -> Api:
    if request.param == "in process":
        client = serve(hostile.root).client

        def get(route: str, **query: str) -> tuple[int, str, bytes]:
            response = client.get(f"{ROUTE}/{route}", query_string=query)
            return response.status_code, response.mimetype, response.get_data()

        return Api(request.param, get)
    url = servers(request.param)
    return Api(request.param, lambda route, **query: fetch(plugin_url(url, route, **query)), url, wait_for_json)


def steps_by_run(answer: dict) -> dict[str, list[int]]:
    return {r["run"]: r["steps"] for r in answer["runs"]}


def assert_png(body: bytes, size: tuple[int, int]) -> None:
    image = Image.open(io.BytesIO(body))
    assert (image.format, image.size) == ("PNG", size)
    image.load()  # decodes every pixel: a damaged PNG raises here


def test_index_and_text_return_markup_names_verbatim(api, hostile):
    index = api.json("index")
    assert index["runs"] == IMAGE_RUNS
    layers = [layer for kind in index["kinds"] for layer in kind["layers"]]
    assert {layer["layer"] for layer in layers} == {LAYER_PART}
    assert sorted(view["tag"] for layer in layers for view in layer["views"]) == hostile.tags
    for run in (GOOD, SVG_RUN, TRUNCATED):
        answer = api.json("text", run=run)
        assert answer["run"] == run
        texts = {t["tag"]: t["text"] for t in answer["texts"]}
        assert texts["cnnvis/summary/model/layers/text_summary"] == hostile.layer_table
        assert all(tag.startswith("cnnvis/summary/") for tag in texts)
    assert f"| &nbsp;&nbsp;{LAYER} | Conv2d |" in hostile.layer_table
    # The class names are drawn into the Grad-CAM pictures only: no answer carries them as text.
    _, _, raw_index = api.get("index")
    _, _, raw_text = api.get("text", run=GOOD)
    for name in CLASS_NAMES:
        assert name not in raw_index.decode() and name not in raw_text.decode()


def test_hostile_kinds_table_labels_the_kinds_as_text(api):
    """Markup, bars and junk rows in a kinds table: /index still answers, each label a plain string."""
    index = api.json("index")
    assert index["runs"] == IMAGE_RUNS  # a run holding only a table shows no row
    assert [(k["kind"], k["label"]) for k in index["kinds"]] == HOSTILE_KINDS
    assert all(k["layers"] and k["layers"][0]["views"] for k in index["kinds"])
    assert api.json("text", run=LABELS_RUN)["texts"] == [
        {"tag": "cnnvis/summary/model/kinds/text_summary", "step": 0, "text": HOSTILE_KINDS_TABLE}
    ]


@pytest.mark.parametrize("loader", LOADERS)
def test_markup_goes_out_as_json_no_browser_reads_as_html(servers, loader):
    with urllib.request.urlopen(plugin_url(servers(loader), "index"), timeout=30) as response:
        assert response.headers.get_content_type() == "application/json"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert json.loads(response.read())["runs"] == IMAGE_RUNS


def test_good_run_is_fully_listed_and_served(api, hostile):
    for tag in hostile.tags:
        answer = api.steps(tag, lambda answer: {GOOD, SVG_RUN} <= steps_by_run(answer).keys())
        steps = steps_by_run(answer)
        assert steps[GOOD] == steps[SVG_RUN] == LOGGED_STEPS
        # A run that cannot be read (SVG_RUN under the Rust server, first in order) does not hide the size.
        assert answer["width"] and answer["height"]
        for step in LOGGED_STEPS:
            status, media_type, body = api.get("image", run=GOOD, tag=tag, step=str(step))
            assert (status, media_type) == (200, "image/png"), body[:300]
            assert_png(body, (answer["width"], answer["height"]))
        status, media_type, body = api.get("image", run=SVG_RUN, tag=tag, step="2")
        if api.rust:  # TensorBoard's limitation (see the module docstring): a clean JSON error
            assert (status, media_type) == (400, "application/json") and json.loads(body)["error"]
        else:
            assert (status, media_type) == (200, "image/png"), body[:300]
            assert_png(body, (answer["width"], answer["height"]))


def test_truncated_run_lists_the_steps_written_before_the_cut(api, hostile):
    for tag in hostile.tags:
        expected = hostile.truncated.get(tag, [])
        answer = api.steps(tag, lambda answer, expected=expected: steps_by_run(answer).get(TRUNCATED, []) == expected)
        for step in expected:
            status, media_type, body = api.get("image", run=TRUNCATED, tag=tag, step=str(step))
            assert (status, media_type) == (200, "image/png"), body[:300]
            assert_png(body, (answer["width"], answer["height"]))
        for step in sorted(set(LOGGED_STEPS) - set(expected)):
            status, media_type, body = api.get("image", run=TRUNCATED, tag=tag, step=str(step))
            assert (status, media_type) == (404, "application/json"), body[:300]


def test_corrupted_run_serves_what_was_recovered(api, hostile):
    def recovered(answer: dict) -> bool:
        return hostile.flipped_intact.get(answer["tag"], set()) <= set(steps_by_run(answer).get(FLIPPED, []))

    for tag in hostile.tags:
        answer = api.steps(tag, recovered)
        steps = steps_by_run(answer).get(FLIPPED, [])
        assert set(steps) <= set(LOGGED_STEPS)
        for step in steps:
            status, media_type, body = api.get("image", run=FLIPPED, tag=tag, step=str(step))
            assert (status, media_type) == (200, "image/png"), body[:300]
            if (tag, step) != hostile.damaged:  # served as read by the Rust data server, garbage included
                assert_png(body, (answer["width"], answer["height"]))


def test_a_run_whose_images_cannot_be_read_does_not_hide_the_image_size(hostile, monkeypatch):
    """In process, the Rust data server's refusal of blob keys naming SVG_RUN (the first run in order)."""
    served = serve(hostile.root)
    provider = served.plugin._data_provider
    read_blob = provider.read_blob

    def read_blob_like_rust(ctx, *, blob_key):
        if '"' in data_provider._decode_blob_key(blob_key)[2]:
            raise errors.InvalidArgumentError("failed to parse blob key: BadJson(...)")
        return read_blob(ctx, blob_key=blob_key)

    monkeypatch.setattr(provider, "read_blob", read_blob_like_rust)
    for tag in hostile.tags:
        response = served.client.get(f"{ROUTE}/steps", query_string={"tag": tag})
        assert response.status_code == 200, response.get_data(as_text=True)
        answer = json.loads(response.get_data())
        assert answer["runs"][0]["run"] == SVG_RUN
        response = served.client.get(f"{ROUTE}/image", query_string={"run": GOOD, "tag": tag, "step": "0"})
        assert_png(response.get_data(), (answer["width"], answer["height"]))
    response = served.client.get(f"{ROUTE}/image", query_string={"run": SVG_RUN, "tag": hostile.tags[0], "step": "0"})
    assert (response.status_code, response.mimetype) == (400, "application/json")


@pytest.mark.parametrize("run", ["garbage", "empty", "nope"])
def test_runs_without_readable_data_answer_cleanly(api, hostile, run):
    status, media_type, body = api.get("text", run=run)
    assert media_type == "application/json" and status in (200, 404), body[:300]
    if status == 200:  # TensorBoard lists the run (the Rust server does), but it holds nothing
        assert json.loads(body) == {"run": run, "texts": []}
    status, media_type, body = api.get("image", run=run, tag=hostile.tags[0], step="0")
    assert (status, media_type) == (404, "application/json"), body[:300]


# The tab in Chromium.


@dataclass
class HostileTab(Tab):
    failed: list[str] = field(default_factory=list)  #: URLs answered with an error status


@pytest.fixture
def open_tab(browser) -> Iterator[Callable[..., HostileTab]]:
    """``open_tab(url)`` opens TensorBoard at ``url``; afterwards checks that no dialog opened and nothing failed."""
    tabs: list[HostileTab] = []

    def open_(url: str) -> HostileTab:
        page = browser.new_page(viewport=VIEWPORT)
        tab = HostileTab(page)
        tab.listen()
        page.on("response", lambda response: response.status >= 400 and tab.failed.append(response.url))
        page.goto(url)
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        tab.close_and_check()
        assert tab.failed == [], "a request failed"


def assert_nothing_injected(tab: HostileTab) -> None:
    assert tab.frame.evaluate(FOREIGN_ELEMENTS, sorted(TAB_ELEMENTS)) == []
    assert tab.page.locator("img[src='x'], svg[onload], [onerror]").count() == 0


@pytest.mark.parametrize("loader", LOADERS)
def test_tab_shows_markup_as_text_and_the_readable_images(open_tab, servers, hostile, loader):
    damaged_tag, damaged_step = hostile.damaged
    kind, _, view = tags.parse_tag(damaged_tag)
    tab = open_tab(f"{servers(loader)}/?p.cnnvis.kind={kind}&p.cnnvis.view={view}&p.cnnvis.size=64#cnnvis")
    tab.attach()
    frame = tab.frame
    # Small cells: every slot is on screen, so every one gets its image.
    frame.wait_for_function(EVERY_SLOT_HAS_ITS_IMAGE)
    frame.wait_for_function(ALL_IMAGES_SETTLED)
    assert tab.row_runs() == IMAGE_RUNS
    assert frame.locator(".cv-chip .cv-run-name").all_text_contents() == IMAGE_RUNS
    assert frame.locator(f".cv-thumb[data-run='{SVG_RUN}']").count() > 0
    assert frame.locator("select[aria-label='Layer'] option").all_text_contents() == [LAYER_PART]
    assert frame.locator("select[aria-label='Layer']").input_value() == LAYER_PART
    assert LAYER_PART in frame.locator(".cv-card-title").first.text_content()
    assert frame.locator("select[aria-label='Filmstrip run'] option").all_text_contents() == IMAGE_RUNS
    # The kinds table's labels, markup and all, are the buttons' text (and their titles: long ones are cut).
    buttons = frame.locator(".cv-segmented button")
    assert buttons.all_text_contents() == [label for _, label in HOSTILE_KINDS]
    assert buttons.evaluate_all("nodes => nodes.map((node) => node.title)") == [label for _, label in HOSTILE_KINDS]
    assert frame.locator(f"button[data-kind='{kind}']").get_attribute("aria-pressed") == "true"
    label = dict(HOSTILE_KINDS)[kind]
    assert frame.locator(".cv-card-title").first.text_content().startswith(f"{label} · {LAYER_PART} · ")
    assert_nothing_injected(tab)

    # Every image loads but two kinds. With the Rust data server, those of SVG_RUN fail (a JSON 400),
    # and the damaged one is served as read: Chromium draws what it can of it, or marks its cell failed.
    # With the Python loader the damaged record ends what TensorBoard reads of that file.
    rust = loader == LOADERS[0]
    unreadable = {(SVG_RUN, step) for step in LOGGED_STEPS} if rust else set()
    showing = {GOOD} | ({TRUNCATED} if damaged_tag in hostile.truncated else set()) | ({SVG_RUN} if not rust else set())
    showing |= {FLIPPED} if damaged_tag in hostile.flipped_intact else set()
    frame.wait_for_function(IMAGES_SETTLED_AS_CELLS)
    images = frame.eval_on_selector_all(".cv-thumb img", IMAGE_STATES)
    assert {image["run"] for image in images if image["width"] > 0} == showing
    for image in images:
        if (image["run"], image["step"]) in unreadable:
            assert image["width"] == 0 and image["failed"], image
        elif (image["run"], image["step"]) != (FLIPPED, damaged_step):
            assert image["width"] > 0 and not image["failed"], image
    if rust:
        failed = [urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["run"] for url in tab.failed]
        assert failed and all(run == [SVG_RUN] for run in failed)
        assert tab.console_errors and all("status of 400" in error for error in tab.console_errors)
        tab.console_errors.clear()
        tab.failed.clear()

    # The layer table of the first run holds the layer's real name, as text.
    frame.locator(".cv-layers > summary").click()
    assert frame.locator(".cv-layers > summary").text_content() == f"Layer table · {SVG_RUN}"
    frame.wait_for_selector(".cv-text-table")
    assert f"\u00a0\u00a0{LAYER}" in frame.locator(".cv-text-table td").all_text_contents()
    # The enlarged view names the run and the layer as text.
    frame.locator(f".cv-grid .cv-thumb[data-run='{GOOD}']").first.click()
    assert frame.locator(".cv-lightbox-run").text_content() == GOOD
    assert frame.locator(".cv-lightbox-details").text_content().startswith(f"{label} · {LAYER_PART} · ")
    frame.locator(".cv-lightbox").press("Escape")
    assert_nothing_injected(tab)


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory, start_tensorboard) -> str:
    return start_tensorboard(tmp_path_factory.mktemp("empty_logdir")).url


def test_empty_logdir_has_no_runs(empty_server):
    status, media_type, body = fetch(plugin_url(empty_server, "index"))
    assert (status, media_type) == (200, "application/json")
    assert json.loads(body) == {"runs": [], "kinds": []}
    status, _, body = fetch(f"{empty_server}/data/plugins_listing")
    assert status == 200 and json.loads(body)["cnnvis"]["enabled"] is False


def test_empty_logdir_shows_the_empty_state(open_tab, empty_server):
    tab = open_tab(f"{empty_server}/#cnnvis")
    frame = tab.page.wait_for_selector(FRAME, timeout=30_000).content_frame()
    frame.wait_for_selector("text=No cnnvis data: add VisLogger to your training loop", timeout=30_000)
    assert frame.locator(".cv-code").text_content() == (
        'vis = VisLogger(model, "runs/exp", probe=probe_images)\nvis.step(step)'
    )
    assert frame.locator(".cv-grid-wrap, .cv-error").count() == 0
