"""The "CNN Vis" tab in Chromium (through Playwright), on a real TensorBoard over the demo's runs,
and over runs of a user's own kind written here with ``SummaryWriter`` (labelled by a kinds table).

Skipped when Playwright or /usr/bin/chromium is missing, except under ``CI=true`` where that fails.
Every test also checks that the page logged no console error and opened no dialog.
"""

from __future__ import annotations

import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import Kind, VisLogger, tags
from cnnvis_tb.render import denormalize

VIEWPORT = {"width": 1400, "height": 900}
#: A run whose name is markup: it must show as text and run nothing.
HOSTILE_RUN = "<img src=x onerror=alert(1)>"
#: Where the screenshot goes (tests/artifacts/, ignored by git; docs/screenshot.py makes the README's from real runs).
SCREENSHOT = Path(__file__).resolve().parent / "artifacts" / "tab.png"
FRAME = 'iframe[src*="name=cnnvis"]'

#: Resolves once every <img> created in the tab has finished (loaded or failed).
ALL_IMAGES_SETTLED = """() => {
    const images = [...document.querySelectorAll('.cv-thumb img')];
    return images.length > 0 && images.every((image) => image.complete);
}"""

#: run + "\\n" + step of every image slot at least partly on screen (inside the frame's viewport and
#: inside the grid's horizontally scrolling box), and the number of slots.
SLOTS_ON_SCREEN = """() => {
    const onScreen = [];
    const slots = document.querySelectorAll('.cv-thumb');
    for (const slot of slots) {
        const box = slot.getBoundingClientRect();
        let [left, right] = [Math.max(box.left, 0), Math.min(box.right, innerWidth)];
        const [top, bottom] = [Math.max(box.top, 0), Math.min(box.bottom, innerHeight)];
        const scroller = slot.closest('.cv-grid-scroll');
        if (scroller) {
            const clip = scroller.getBoundingClientRect();
            [left, right] = [Math.max(left, clip.left), Math.min(right, clip.right)];
        }
        if (right > left && bottom > top) onScreen.push(slot.dataset.run + '\\n' + slot.dataset.step);
    }
    return {onScreen, total: slots.length};
}"""


#: A user's own kind, its label in the kinds table, and what the custom logdir holds.
CUSTOM_KIND, CUSTOM_LABEL, CUSTOM_LAYER = "channel_means", "Channel means", "features.3"
CUSTOM_RUNS, CUSTOM_STEPS = ["custom_a", "custom_b"], [0, 5, 10]
#: The kinds of the custom logdir as the tab must list them: the table's two, then one no table lists.
CUSTOM_BUTTONS = [CUSTOM_LABEL, "Grad-CAM", "zeta_kind"]
CUSTOM_SIZE = (12, 8)  #: width, height
#: [r, g, b] of the top left pixel of every image in the grid, read back by the page through a canvas.
GRID_PIXELS = """() => [...document.querySelectorAll('.cv-grid .cv-thumb img')].map((image) => {
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
    const context = canvas.getContext('2d');
    context.drawImage(image, 0, 0);
    return {run: image.parentElement.dataset.run, step: Number(image.parentElement.dataset.step), src: image.src,
            size: [image.naturalWidth, image.naturalHeight], rgb: [...context.getImageData(0, 0, 1, 1).data.slice(0, 3)]};
})"""


def custom_colour(run: str, step: int) -> list[int]:
    return [10 + 100 * CUSTOM_RUNS.index(run), 20 * step, 200]


@pytest.fixture(scope="module")
def custom_server(browser, start_tensorboard, wait_for_json, tmp_path_factory) -> str:
    """TensorBoard over two runs of a user's kind (plus gradcam and a kind no table lists), with kinds tables."""
    logdir = tmp_path_factory.mktemp("custom_kind")
    table = tags.kinds_table([(CUSTOM_KIND, CUSTOM_LABEL, "mean of each channel"), ("gradcam", "Grad-CAM", "")])
    width, height = CUSTOM_SIZE
    for run in CUSTOM_RUNS:
        with SummaryWriter(logdir / run) as writer:
            writer.add_text(tags.KINDS_TABLE_TAG, table, 0)
            for step in CUSTOM_STEPS:
                image = np.empty((3, height, width), np.uint8)
                image[:] = np.array(custom_colour(run, step), np.uint8)[:, None, None]
                for kind in (CUSTOM_KIND, "gradcam", "zeta_kind"):
                    writer.add_image(tags.image_tag(kind, CUSTOM_LAYER, tags.probe_view(0)), image, step)
    url = start_tensorboard(logdir, plugin="cnnvis").url
    wait_for_json(
        f"{url}/data/plugin/cnnvis/index",
        lambda index: every_view_lists(index, CUSTOM_RUNS) and [k["label"] for k in index["kinds"]] == CUSTOM_BUTTONS,
    )
    return url


@pytest.fixture(scope="module")
def demo_runs(demo_logdir) -> list[str]:
    return sorted(run.name for run in demo_logdir.iterdir())


def every_view_lists(index: dict, runs: list[str]) -> bool:
    """Whether TensorBoard has loaded every run (it loads them one by one): each view lists them all."""
    views = [view for kind in index["kinds"] for layer in kind["layers"] for view in layer["views"]]
    return index["runs"] == sorted(runs) and all(view["runs"] == sorted(runs) for view in views)


@pytest.fixture(scope="module")
def server(browser, demo_logdir, demo_runs, start_tensorboard, wait_for_json, tmp_path_factory) -> str:
    logdir = tmp_path_factory.mktemp("browsed")
    for run in demo_runs:
        shutil.copytree(demo_logdir / run, logdir / run)
    shutil.copytree(demo_logdir / demo_runs[0], logdir / HOSTILE_RUN)
    url = start_tensorboard(logdir, plugin="cnnvis").url
    wait_for_json(f"{url}/data/plugin/cnnvis/index", lambda index: every_view_lists(index, [*demo_runs, HOSTILE_RUN]))
    return url


@pytest.fixture(scope="module")
def demo_server(browser, demo_logdir, demo_runs, start_tensorboard, wait_for_json) -> str:
    """TensorBoard over the demo runs only (for the README's screenshot)."""
    url = start_tensorboard(demo_logdir, plugin="cnnvis").url
    wait_for_json(f"{url}/data/plugin/cnnvis/index", lambda index: every_view_lists(index, demo_runs))
    return url


@dataclass
class Tab:
    """A TensorBoard page showing the tab, with what it logged, asked and opened."""

    page: object
    frame: object = None
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    image_requests: list[dict[str, str]] = field(default_factory=list)

    def attach(self) -> None:
        """Finds the tab's iframe and waits for its first view and images."""
        self.frame = self.page.wait_for_selector(FRAME, timeout=30_000).content_frame()
        self.frame.wait_for_selector(".cv-grid-wrap", timeout=30_000)
        self.frame.wait_for_function(ALL_IMAGES_SETTLED, timeout=30_000)

    def images(self) -> list[dict]:
        return self.frame.eval_on_selector_all(
            ".cv-thumb img", "images => images.map(i => ({src: i.src, width: i.naturalWidth}))"
        )

    def listen(self) -> None:
        """Records the page's console errors, uncaught errors and dialogs (each dialog is dismissed)."""
        self.page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))

    def close_and_check(self) -> None:
        """Closes the page and fails if it ever opened a dialog or logged an error."""
        self.page.wait_for_timeout(300)  # let late errors or dialogs surface
        self.page.close()
        assert self.dialogs == [], "the page opened a dialog"
        assert self.console_errors == [], "the page logged errors"

    def row_runs(self) -> list[str]:
        return self.frame.locator(".cv-row-head .cv-run-name").all_text_contents()

    def wait_for_url_part(self, part: str) -> None:
        """Waits until TensorBoard's URL (where the tab saves its selection, a moment after a change) holds ``part``."""
        self.page.wait_for_function("part => location.href.includes(part)", arg=part, timeout=10_000)


@pytest.fixture
def open_tab(browser, server) -> Iterator:
    """``open_tab(query="", server=...)`` opens TensorBoard on the tab; checks console and dialogs afterwards."""
    tabs: list[Tab] = []
    default_server = server

    def open_(query: str = "", *, wait: bool = True, server: str = default_server) -> Tab:
        page = browser.new_page(viewport=VIEWPORT)
        tab = Tab(page)
        tab.listen()
        page.on("request", lambda request: record_image_request(tab, request.url))
        page.goto(f"{server}/{query}#cnnvis")
        if wait:
            tab.attach()
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        tab.close_and_check()


def record_image_request(tab: Tab, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.path.endswith("/data/plugin/cnnvis/image"):
        tab.image_requests.append(dict(urllib.parse.parse_qsl(parts.query)))


def test_images_render_and_only_those_on_screen_are_requested(open_tab, demo_runs):
    # Large cells, so that most of the grid and the filmstrip are off screen.
    tab = open_tab(f"?p.cnnvis.kind=gradcam&p.cnnvis.size=400&p.cnnvis.hide={urllib.parse.quote(HOSTILE_RUN)}")
    assert tab.row_runs() == demo_runs
    images = tab.images()
    assert images and all(image["width"] > 0 for image in images)
    slots = tab.frame.evaluate(SLOTS_ON_SCREEN)
    requested = {f"{r['run']}\n{r['step']}" for r in tab.image_requests}
    assert requested, "no image was requested"
    assert requested <= set(slots["onScreen"]), "an image off screen was requested"
    assert len(tab.image_requests) <= len(slots["onScreen"])
    assert slots["total"] > len(slots["onScreen"]), "the check needs slots off screen"
    # Scrolling brings the rest in.
    tab.frame.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    tab.frame.wait_for_function(
        "() => document.querySelectorAll('.cv-film .cv-thumb img').length === document.querySelectorAll('.cv-film .cv-thumb').length"
    )
    tab.frame.wait_for_function(ALL_IMAGES_SETTLED)
    assert all(image["width"] > 0 for image in tab.images())


def test_run_named_like_markup_shows_as_text_and_runs_nothing(open_tab):
    tab = open_tab()
    assert HOSTILE_RUN in tab.row_runs()
    assert HOSTILE_RUN in tab.frame.locator(".cv-chip .cv-run-name").all_text_contents()
    assert HOSTILE_RUN in tab.frame.locator("select[aria-label='Filmstrip run'] option").all_text_contents()
    assert tab.frame.locator("img[src='x']").count() == 0
    assert tab.page.locator("img[src='x']").count() == 0
    slot = tab.frame.locator(f".cv-thumb[data-run='{HOSTILE_RUN}']").first
    slot.click()
    assert tab.frame.locator(".cv-lightbox-run").text_content() == HOSTILE_RUN
    tab.frame.locator(".cv-lightbox").press("Escape")
    tab.frame.wait_for_function(ALL_IMAGES_SETTLED)


def test_changing_the_layer_changes_the_images(open_tab):
    tab = open_tab("?p.cnnvis.kind=features")
    layers = tab.frame.locator("select[aria-label='Layer'] option").evaluate_all("options => options.map(o => o.value)")
    assert len(layers) > 1
    before = tab.images()
    assert all(f"%2F{urllib.parse.quote(layers[0])}%2F" in image["src"] for image in before)
    tab.frame.select_option("select[aria-label='Layer']", layers[-1])
    tab.frame.wait_for_function(
        "layer => [...document.querySelectorAll('.cv-thumb img')].some(i => i.src.includes(layer))",
        arg=f"%2F{urllib.parse.quote(layers[-1])}%2F",
    )
    tab.frame.wait_for_function(ALL_IMAGES_SETTLED)
    after = tab.images()
    assert after and all(f"%2F{urllib.parse.quote(layers[-1])}%2F" in image["src"] for image in after)
    assert all(image["width"] > 0 for image in after)
    assert {image["src"] for image in after}.isdisjoint(image["src"] for image in before)
    tab.wait_for_url_part("p.cnnvis.layer=" + urllib.parse.quote(layers[-1]))


def test_click_enlarges_and_escape_closes(open_tab):
    tab = open_tab("?p.cnnvis.kind=gradcam")
    lightbox = tab.frame.locator(".cv-lightbox")
    assert lightbox.is_hidden()
    tab.frame.locator(".cv-grid .cv-thumb").first.click()
    assert lightbox.is_visible()
    big = tab.frame.locator(".cv-lightbox-image")
    tab.frame.wait_for_function("() => document.querySelector('.cv-lightbox-image').naturalWidth > 0")
    first = big.get_attribute("src")
    tab.frame.locator(".cv-lightbox").press("ArrowRight")
    assert big.get_attribute("src") != first
    tab.frame.locator(".cv-lightbox").press("Escape")
    assert lightbox.is_hidden()


def test_selection_is_kept_in_the_url_and_restored_on_reload(open_tab, demo_runs):
    tab = open_tab()
    frame = tab.frame
    frame.click("button[data-kind='features']")
    layer = frame.locator("select[aria-label='Layer'] option").last.get_attribute("value")
    frame.select_option("select[aria-label='Layer']", layer)
    view = frame.locator("select[aria-label='Image'] option").nth(1).get_attribute("value")
    frame.select_option("select[aria-label='Image']", view)
    frame.locator("input[aria-label='Image size']").fill("240")
    frame.locator(".cv-chip", has_text=HOSTILE_RUN).locator("input").uncheck()
    frame.locator("input[aria-label='Exact step']").fill("3")
    frame.locator("input[aria-label='Exact step']").press("Enter")
    tab.wait_for_url_part("p.cnnvis.step=3")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(tab.page.url).query)
    assert query == {
        "p.cnnvis.kind": ["features"],
        "p.cnnvis.layer": [layer],
        "p.cnnvis.view": [view],
        "p.cnnvis.size": ["240"],
        "p.cnnvis.step": ["3"],
        "p.cnnvis.hide": [HOSTILE_RUN],
    }

    tab.page.reload()
    tab.attach()
    frame = tab.frame
    assert frame.locator("button[data-kind='features']").get_attribute("aria-pressed") == "true"
    assert frame.locator("select[aria-label='Layer']").input_value() == layer
    assert frame.locator("select[aria-label='Image']").input_value() == view
    assert frame.locator("input[aria-label='Image size']").input_value() == "240"
    assert frame.locator("input[aria-label='Exact step']").input_value() == "3"
    assert not frame.locator(".cv-chip", has_text=HOSTILE_RUN).locator("input").is_checked()
    assert tab.row_runs() == demo_runs
    assert frame.locator(".cv-step-head.cv-current").text_content() == "3"


def test_loading_empty_and_error_states(open_tab):
    held = []
    tab = open_tab(wait=False)
    tab.page.route("**/data/plugin/cnnvis/index", lambda route: held.append(route))
    tab.page.reload()
    frame = tab.page.wait_for_selector(FRAME).content_frame()
    frame.wait_for_selector("text=Loading cnnvis data")
    held.pop().fulfill(json={"runs": [], "kinds": []})
    frame.wait_for_selector("text=No cnnvis data: add VisLogger to your training loop")
    snippet = frame.locator(".cv-code").text_content()
    assert snippet == 'vis = VisLogger(model, "runs/exp", probe=probe_images)\nvis.step(step)'

    tab.page.unroute("**/data/plugin/cnnvis/index")
    tab.page.route(
        "**/data/plugin/cnnvis/index", lambda route: route.fulfill(status=503, json={"error": "the disk is on fire"})
    )
    tab.page.reload()
    frame = tab.page.wait_for_selector(FRAME).content_frame()
    frame.wait_for_selector("text=Could not load cnnvis data")
    assert "the disk is on fire" in frame.locator(".cv-error-text").text_content()
    tab.page.unroute("**/data/plugin/cnnvis/index")
    frame.click("text=Retry")
    frame.wait_for_selector(".cv-grid-wrap")
    # The one error logged is the 503 this test served on purpose; nothing else may appear.
    assert [e for e in tab.console_errors if "503" not in e] == []
    tab.console_errors.clear()


def test_a_users_kind_shows_with_its_label_and_its_images(open_tab, custom_server):
    tab = open_tab(server=custom_server)
    frame = tab.frame
    # The kinds table orders and labels the buttons; the first kind is the one shown.
    assert frame.locator(".cv-segmented button").all_text_contents() == CUSTOM_BUTTONS
    assert frame.locator(f"button[data-kind='{CUSTOM_KIND}']").get_attribute("aria-pressed") == "true"
    assert frame.locator(".cv-card-title").first.text_content() == f"{CUSTOM_LABEL} · {CUSTOM_LAYER} · probe image 0"
    assert tab.row_runs() == CUSTOM_RUNS
    # Every cell of the grid holds the image written for its run and step.
    pixels = frame.evaluate(GRID_PIXELS)
    assert sorted((p["run"], p["step"]) for p in pixels) == [(r, s) for r in CUSTOM_RUNS for s in CUSTOM_STEPS]
    for pixel in pixels:
        assert (
            f"tag={urllib.parse.quote(tags.image_tag(CUSTOM_KIND, CUSTOM_LAYER, 'probe_000'), safe='')}" in pixel["src"]
        )
        assert pixel["size"] == list(CUSTOM_SIZE)
        assert pixel["rgb"] == custom_colour(pixel["run"], pixel["step"]), pixel
    # The enlarged view names the kind by its label.
    frame.locator(".cv-grid .cv-thumb[data-run='custom_b'][data-step='5']").click()
    assert (
        frame.locator(".cv-lightbox-details").text_content()
        == f"{CUSTOM_LABEL} · {CUSTOM_LAYER} · probe image 0 · step 5"
    )
    frame.locator(".cv-lightbox").press("Escape")
    # A kind no table lists is named by its name, and kept in the URL like any other.
    frame.click("button[data-kind='zeta_kind']")
    frame.wait_for_function("() => document.querySelector('.cv-card-title').textContent.startsWith('zeta_kind · ')")
    tab.wait_for_url_part("p.cnnvis.kind=zeta_kind")
    frame.wait_for_function(ALL_IMAGES_SETTLED)


def test_screenshot_of_two_runs_across_steps(open_tab, demo_server):
    tab = open_tab("?p.cnnvis.kind=gradcam&p.cnnvis.size=184", server=demo_server)
    tab.frame.locator(".cv-layers > summary").click()
    tab.frame.wait_for_selector(".cv-text-table")
    tab.frame.wait_for_function(ALL_IMAGES_SETTLED)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 50_000


class ProbeColour(Kind):
    """A kind defined in this test file only: each probe image's mean colour as a flat 8x8 swatch (scaled by the
    step, so every step's picture differs)."""

    name, label, every, layer_role = "probe_colour", "Probe colour", 2, None

    def log(self, ctx, out, computed):
        colours = ctx.shown.mean(dim=(2, 3))  # [N, 3] in [0, 1]
        for i, colour in enumerate(colours):
            swatch = (colour * (0.5 + ctx.step / 10))[:, None, None].clamp(0, 1).expand(3, 8, 8)
            out.image("input", tags.probe_view(i), swatch)


@pytest.fixture(scope="module")
def vislogger_kind_server(browser, start_tensorboard, wait_for_json, tmp_path_factory) -> tuple[str, torch.Tensor]:
    """TensorBoard over a run that VisLogger logged with the kernels kind and ProbeColour."""
    logdir = tmp_path_factory.mktemp("vislogger_kind")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    probe = torch.rand(2, 3, 12, 12)
    with VisLogger(model, logdir / "run", probe=probe, kinds=["kernels", ProbeColour()], strict=True) as vis:
        for step in range(5):
            vis.step(step)
    url = start_tensorboard(logdir, plugin="cnnvis").url
    wait_for_json(f"{url}/data/plugin/cnnvis/index",
                  lambda index: ProbeColour.label in [k["label"] for k in index["kinds"]])
    return url, probe


def test_a_kind_logged_by_vislogger_shows_in_the_tab(open_tab, vislogger_kind_server):
    url, probe = vislogger_kind_server
    tab = open_tab(server=url)
    frame = tab.frame
    assert frame.locator(".cv-segmented button").all_text_contents() == ["Kernels", "Probe colour"]
    frame.click(f"button[data-kind='{ProbeColour.name}']")
    frame.wait_for_function("() => document.querySelector('.cv-card-title').textContent.startsWith('Probe colour · ')")
    frame.wait_for_function(ALL_IMAGES_SETTLED)
    pixels = frame.evaluate(GRID_PIXELS)
    assert sorted(p["step"] for p in pixels) == [0, 2, 4]
    colour = denormalize(probe, None, None)[0].mean(dim=(1, 2))  # shown as the logger shows it (no mean/std)
    for pixel in pixels:
        expected = (colour * (0.5 + pixel["step"] / 10)).clamp(0, 1) * 255
        assert pixel["size"] == [8, 8]
        assert np.abs(np.array(pixel["rgb"]) - expected.numpy()).max() <= 1.5, pixel
