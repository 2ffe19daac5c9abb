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



def hold_steps_after_the_first(tab: Tab, trim_first: bool) -> tuple[list, list]:
    """Routes the tab's ``/steps`` requests: the first is served (with step 0 only if ``trim_first``), later ones
    are held in the first list returned until ``True`` is appended to the second; then all pass."""
    first, held, released = [], [], []

    def steps(route):
        if released:
            route.continue_()
        elif not first:
            answer = route.fetch().json()
            for run in answer["runs"]:
                run["steps"] = run["steps"][:1] if trim_first else run["steps"]
            first.append(answer)
            route.fulfill(json=answer)
        else:
            held.append(route)

    tab.page.route("**/data/plugin/cnnvis/steps*", steps)
    return held, released


def wait_until_held(tab: Tab, held: list) -> None:
    for _ in range(200):
        if held:
            return
        tab.page.wait_for_timeout(25)
    raise AssertionError("the next image's steps were never asked for")


def release(held: list, released: list) -> None:
    released.append(True)
    for route in held:
        route.continue_()


def test_a_step_typed_while_the_next_images_steps_load_is_the_one_shown(open_tab):
    """Until a new selection's steps arrive the grid shows the old image's columns; a step typed then is resolved
    against the new steps (it was resolved against the old ones, and lost where they did not hold it)."""
    tab = open_tab(wait=False)
    held, released = hold_steps_after_the_first(tab, trim_first=True)  # so a typed 3 has no column there
    tab.page.reload()
    tab.attach()
    frame = tab.frame
    assert frame.locator(".cv-step-head").all_text_contents() == ["0"]
    frame.click("button[data-kind='features']")
    wait_until_held(tab, held)
    frame.locator("input[aria-label='Exact step']").fill("3")
    frame.locator("input[aria-label='Exact step']").press("Enter")
    release(held, released)
    tab.wait_for_url_part("p.cnnvis.step=3")
    frame.wait_for_function("() => document.querySelector('.cv-step-head.cv-current')?.textContent === '3'")
    assert frame.locator("input[aria-label='Exact step']").input_value() == "3"
    tab.page.unroute("**/data/plugin/cnnvis/steps*")


def test_a_step_being_typed_when_new_steps_arrive_is_kept(open_tab):
    """New data redraws the step controls; a step typed but not yet entered stays in the box and is the one
    entered (the redraw put the latest step back in the box, and the Enter that followed picked nothing)."""
    tab = open_tab(wait=False)
    held, released = hold_steps_after_the_first(tab, trim_first=False)
    tab.page.reload()
    tab.attach()
    frame = tab.frame
    frame.click("button[data-kind='features']")
    wait_until_held(tab, held)
    box = frame.locator("input[aria-label='Exact step']")
    assert box.input_value() != "3"
    box.fill("3")
    release(held, released)
    frame.wait_for_function("() => !document.querySelector('.cv-busy')")
    assert frame.locator(".cv-step-head.cv-current").text_content() != "3"
    assert box.input_value() == "3"
    box.press("Enter")
    tab.wait_for_url_part("p.cnnvis.step=3")
    frame.wait_for_function("() => document.querySelector('.cv-step-head.cv-current')?.textContent === '3'")
    # Typing the step shown and leaving the box (no change to enter) lets later redraws show the step again.
    box.fill("3")
    frame.click("button[aria-label='Next logged step']")
    frame.wait_for_function("() => document.querySelector('.cv-step-head.cv-current')?.textContent === '6'")
    assert box.input_value() == "6"
    tab.page.unroute("**/data/plugin/cnnvis/steps*")


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


def test_with_several_runs_the_first_screen_shows_the_layer_most_of_them_logged(
        open_tab, browser, start_tensorboard, wait_for_json, tmp_path):
    """It showed the alphabetically first layer, which one scratch run alone had: one row, the others hidden."""
    image = np.full((3, 8, 8), 120, np.uint8)
    for run, layer in [("a", "features.3"), ("b", "features.3"), ("c", "0")]:
        with SummaryWriter(tmp_path / run) as writer:
            writer.add_image(tags.image_tag("gradcam", layer, tags.probe_view(0)), image, 0)
    url = start_tensorboard(tmp_path, plugin="cnnvis").url
    wait_for_json(f"{url}/data/plugin/cnnvis/index", lambda index: index["runs"] == ["a", "b", "c"])
    tab = open_tab(server=url)
    assert tab.frame.locator(".cv-card-title").first.text_content() == "gradcam · features.3 · probe image 0"
    assert tab.row_runs() == ["a", "b"]
    tab = open_tab("?p.cnnvis.layer=0", server=url)  # a layer asked for is still the one shown
    assert tab.frame.locator(".cv-card-title").first.text_content() == "gradcam · 0 · probe image 0"


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


# The runs × steps grid and the layer table, over runs with many steps (issue 16).

#: Many steps with long numbers, so that the grid scrolls and the step labels need room.
GRID_STEPS = [100_000 + 1_000 * i for i in range(40)]
GRID_RUNS = ["grid_a", "grid_b"]
#: Two kinds: square images, and tall narrow ones (their columns are narrower than a step number at small sizes).
GRID_KINDS = {"square": (16, 16), "tall": (8, 64)}  #: kind -> (width, height)
#: Labels with bars: the kinds table escapes them as \| (and a backslash as \\).
GRID_KIND_LABELS = {"square": "Square | wide", "tall": "Tall \\ narrow"}
GRID_LAYER = "features.0"
#: A module named like markup: the layer table must show it as text.
MARKUP_LAYER = "<b>x</b><img src=nowhere onerror=alert(1)>"
#: A text summary that is no table (a bar line without a delimiter line): shown preformatted, as written.
NOTES_TEXT = "Trained on shapes.\n| not a table: no delimiter line\n    indented <i>line</i> &amp; more"


class GridNet(nn.Module):
    """Nested modules (indented rows in the layer table) and a convolution named like markup."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.add_module(MARKUP_LAYER, nn.Conv2d(4, 4, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, MARKUP_LAYER)(self.features(x)))


@dataclass(frozen=True)
class GridServer:
    url: str
    layer_table: str
    total: int
    trainable: int


@pytest.fixture(scope="module")
def grid_server(browser, start_tensorboard, wait_for_json, tmp_path_factory) -> GridServer:
    """TensorBoard over two runs of 40 steps each (two kinds), with a real layer table, a kinds table and notes."""
    from cnnvis_tb.layers import layer_table

    logdir = tmp_path_factory.mktemp("grid")
    torch.manual_seed(0)
    model = GridNet()
    model.head[2].bias.requires_grad_(False)  # so that "trainable" differs from the total
    table = layer_table(model, torch.rand(1, 3, 12, 12))
    kinds = tags.kinds_table([(kind, label, "a \\ b | c") for kind, label in GRID_KIND_LABELS.items()])
    for r, run in enumerate(GRID_RUNS):
        with SummaryWriter(logdir / run) as writer:
            writer.add_text(tags.KINDS_TABLE_TAG, kinds, 0)
            writer.add_text(tags.text_tag("model", "layers"), table, 0)
            writer.add_text(tags.text_tag("model", "notes"), NOTES_TEXT, 0)
            for i, step in enumerate(GRID_STEPS):
                for kind, (width, height) in GRID_KINDS.items():
                    image = np.full((3, height, width), (40 + 5 * i + 60 * r) % 256, np.uint8)
                    writer.add_image(tags.image_tag(kind, GRID_LAYER, tags.probe_view(0)), image, step)
    url = start_tensorboard(logdir, plugin="cnnvis").url

    def loaded(index: dict) -> bool:
        return every_view_lists(index, GRID_RUNS) and len(index["kinds"]) == len(GRID_KINDS)

    wait_for_json(f"{url}/data/plugin/cnnvis/index", loaded)
    for kind in GRID_KINDS:
        tag = urllib.parse.quote(tags.image_tag(kind, GRID_LAYER, tags.probe_view(0)), safe="")
        wait_for_json(
            f"{url}/data/plugin/cnnvis/steps?tag={tag}",
            lambda answer: [r["steps"] for r in answer["runs"]] == [GRID_STEPS] * len(GRID_RUNS),
        )
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return GridServer(url, table, total, trainable)


#: Where the grid's parts are, after two animation frames (the grid renders scrolled columns in one):
#: the visible part of the scrolling cells, the run labels, the controls bar, and for every column in
#: the page its cells' extent and its header (box, text, the box of the rendered text, whether the
#: text is cut by an ellipsis or overflows its box).
GRID_GEOMETRY = """async () => {
    await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
    const scroller = document.querySelector('.cv-grid-scroll');
    const box = scroller.getBoundingClientRect();
    const left = box.left + scroller.clientLeft;
    const columns = new Map();
    for (const cell of document.querySelectorAll('.cv-grid .cv-cell')) {
        const column = Number(cell.style.getPropertyValue('--cv-column'));
        const b = cell.getBoundingClientRect();
        const c = columns.get(column) ?? {column, left: b.left, right: b.right, head: null};
        [c.left, c.right] = [Math.min(c.left, b.left), Math.max(c.right, b.right)];
        columns.set(column, c);
    }
    for (const head of document.querySelectorAll('.cv-step-head')) {
        const c = columns.get(Number(head.dataset.column));
        if (!c) continue;
        const b = head.getBoundingClientRect();
        const range = document.createRange();
        range.selectNodeContents(head);
        const text = range.getBoundingClientRect();
        const holder = head.querySelector('.cv-step-label') ?? head;
        c.head = {
            left: b.left, right: b.right, top: b.top, bottom: b.bottom, text: head.textContent,
            textLeft: text.left, textRight: text.right, current: head.classList.contains('cv-current'),
            cut: holder.scrollWidth > holder.clientWidth + 0.5,
        };
    }
    return {
        view: {left, right: left + scroller.clientWidth},
        scrollLeft: scroller.scrollLeft,
        labelsRight: document.querySelector('.cv-grid-labels').getBoundingClientRect().right,
        barBottom: document.querySelector('.cv-bar').getBoundingClientRect().bottom,
        viewportHeight: innerHeight,
        columns: [...columns.values()].sort((a, b) => a.column - b.column),
    };
}"""


def visible_columns(geometry: dict) -> list[dict]:
    view = geometry["view"]
    return [c for c in geometry["columns"] if c["right"] > view["left"] + 0.5 and c["left"] < view["right"] - 0.5]


def check_grid(geometry: dict, *, whole_left: bool = True) -> None:
    """Every visible column is labelled with its step, in its visible part, on screen; the run labels cover
    no cell; with ``whole_left``, the leftmost visible column is whole (the tab scrolled last, not the user)."""
    view = geometry["view"]
    assert view["left"] >= geometry["labelsRight"] - 0.5, "the run labels overlap the cells"
    visible = visible_columns(geometry)
    assert visible, geometry
    if whole_left:
        assert visible[0]["left"] >= view["left"] - 0.5, ("the leftmost visible column is cut off", geometry)
    for column in visible:
        head = column["head"]
        assert head is not None, ("a visible column has no step label", column)
        assert head["text"] == str(GRID_STEPS[column["column"]]), column
        assert abs(head["left"] - column["left"]) < 0.5 and abs(head["right"] - column["right"]) < 0.5, column
        assert not head["cut"], ("a step label does not fit its column", column)
        shown = max(column["left"], view["left"]), min(column["right"], view["right"])
        if shown[1] - shown[0] >= head["textRight"] - head["textLeft"] + 1:
            assert shown[0] - 0.5 <= head["textLeft"] and head["textRight"] <= shown[1] + 0.5, (
                "a step label is not in the visible part of its column", column, view)
        assert geometry["barBottom"] - 1 <= head["top"] and head["bottom"] <= geometry["viewportHeight"], (
            "the step labels are off screen", column, geometry["barBottom"])


def current_column(geometry: dict) -> dict:
    [column] = [c for c in geometry["columns"] if c["head"] and c["head"]["current"]]
    return column


@pytest.mark.parametrize(("kind", "size"), [("square", 160), ("square", 200), ("tall", 160), ("tall", 48)])
def test_grid_shows_whole_labelled_columns_at_load(open_tab, grid_server, kind, size):
    tab = open_tab(f"?p.cnnvis.kind={kind}&p.cnnvis.size={size}", server=grid_server.url)
    geometry = tab.frame.evaluate(GRID_GEOMETRY)
    assert geometry["scrollLeft"] > 0, "the check needs a scrolled grid (the latest step is selected)"
    check_grid(geometry)
    current = current_column(geometry)
    assert current["column"] == len(GRID_STEPS) - 1
    assert geometry["view"]["left"] - 0.5 <= current["left"] and current["right"] <= geometry["view"]["right"] + 0.5


@pytest.mark.parametrize("kind", list(GRID_KINDS))
def test_size_changes_keep_the_selected_step_in_view_and_labelled(open_tab, grid_server, kind):
    selected = GRID_STEPS[13]
    tab = open_tab(f"?p.cnnvis.kind={kind}&p.cnnvis.step={selected}", server=grid_server.url)
    size = tab.frame.locator("input[aria-label='Image size']")
    for value in ["48", "96", "480", "200", "56", "320", "160"]:
        size.fill(value)
        geometry = tab.frame.evaluate(GRID_GEOMETRY)
        check_grid(geometry)
        current = current_column(geometry)
        view = geometry["view"]
        assert current["head"]["text"] == str(selected), value
        assert view["left"] - 0.5 <= current["left"] and current["right"] <= view["right"] + 0.5, (
            f"at size {value} the selected step's column is out of view", current, view)
    tab.wait_for_url_part("p.cnnvis.size=160")


def test_step_labels_stay_with_their_columns_while_scrolling(open_tab, grid_server):
    tab = open_tab("?p.cnnvis.kind=square&p.cnnvis.size=400", server=grid_server.url)
    frame = tab.frame
    # Any horizontal position, columns cut at both edges included: each keeps its label in its visible part.
    for scroll_left in [0, 1000, 1234, 5555, 9000, 100_000]:
        frame.evaluate("left => { document.querySelector('.cv-grid-scroll').scrollLeft = left; }", scroll_left)
        geometry = frame.evaluate(GRID_GEOMETRY)
        check_grid(geometry, whole_left=False)
        assert len(visible_columns(geometry)) >= 2
    # Down the page, the step row stays just below the controls bar while the grid is on screen.
    frame.evaluate("""() => {
        const grid = document.querySelector('.cv-grid').getBoundingClientRect();
        const bar = document.querySelector('.cv-bar').getBoundingClientRect();
        window.scrollBy(0, grid.top - bar.bottom + 300);
    }""")
    geometry = frame.evaluate(GRID_GEOMETRY)
    assert geometry["columns"] and frame.evaluate("() => window.scrollY") > 0
    check_grid(geometry, whole_left=False)
    # A click on a step label selects that step (not the last one: that one is "latest", no step in the URL).
    target = visible_columns(geometry)[0]
    assert target["column"] < len(GRID_STEPS) - 1
    frame.locator(f".cv-step-head[data-column='{target['column']}']").click()
    tab.wait_for_url_part(f"p.cnnvis.step={GRID_STEPS[target['column']]}")
    assert frame.locator(".cv-step-head.cv-current").text_content() == str(GRID_STEPS[target["column"]])


#: Every cell of every table in the layer-table card: [[row cells], ...] per table, each cell
#: {text, strong: [texts of its <strong>s], html: whether it holds any element but <strong>}.
LAYER_CARD_TABLES = """() => [...document.querySelectorAll('.cv-layer-table table')].map((table) => ({
    head: [...table.querySelectorAll('thead th')].map((th) => th.textContent),
    rows: [...table.querySelectorAll('tbody tr')].map((tr) => [...tr.children].map((td) => ({
        text: td.textContent,
        strong: [...td.querySelectorAll('strong')].map((s) => s.textContent),
        other: [...td.querySelectorAll('*')].filter((e) => e.localName !== 'strong').map((e) => e.outerHTML),
    }))),
}))"""


def test_layer_table_card_shows_real_tables(open_tab, grid_server):
    tab = open_tab(server=grid_server.url)
    frame = tab.frame
    assert frame.locator(".cv-segmented button").all_text_contents() == list(GRID_KIND_LABELS.values())
    frame.locator(".cv-layers > summary").click()
    frame.wait_for_selector(".cv-layer-table table")
    layers, kinds = frame.evaluate(LAYER_CARD_TABLES)
    # The layer table: its header, one row per module (nested ones indented), the total in bold.
    assert layers["head"] == ["layer", "type", "output shape", "parameters"]
    names = [row[0]["text"] for row in layers["rows"]]
    assert names == ["features", "\u00a0\u00a0features.0", "\u00a0\u00a0features.1", MARKUP_LAYER, "head",
                     "\u00a0\u00a0head.0", "\u00a0\u00a0head.1", "\u00a0\u00a0head.2", "total"]
    assert all(len(row) == 4 for row in layers["rows"])
    total = layers["rows"][-1]
    assert total[0]["strong"] == ["total"] and total[1]["text"] == "GridNet"
    assert total[3]["strong"] == [f"{grid_server.total:,}"]
    assert total[3]["text"] == f"{grid_server.total:,} ({grid_server.trainable:,} trainable)"
    assert all(not cell["other"] for row in layers["rows"] for cell in row), "markup in a cell became elements"
    # The kinds table: escaped bars and backslashes are literal characters, in their cells.
    assert kinds["head"] == ["kind", "label", "details"]
    assert [[cell["text"] for cell in row] for row in kinds["rows"]] == [
        [kind, label, "a \\ b | c"] for kind, label in GRID_KIND_LABELS.items()
    ]
    # Text that is no table stays preformatted, as written.
    assert frame.locator(".cv-layer-table pre").all_text_contents() == [NOTES_TEXT]
    card = frame.locator(".cv-layer-table")
    assert "**" not in card.text_content()
    assert card.locator("b, i, img").count() == 0
    assert frame.locator("img[src*='nowhere'], [onerror]").count() == 0


#: textSummary (views.js, the module the tab runs) over `text`: per block, its element name and either
#: its text or, for a table, its header and rows as [[cell text, alignment class, [strong texts]]].
TEXT_SUMMARY = """async (text) => {
    const {textSummary} = await import(new URL('static/views.js', document.baseURI).href);
    const cell = (c) => [c.textContent, c.className, [...c.querySelectorAll('strong')].map((s) => s.textContent),
                         [...c.querySelectorAll('*')].filter((e) => e.localName !== 'strong').length];
    return [...textSummary(text).children].map((block) => block.localName === 'table'
        ? {table: [...block.querySelectorAll('tr')].map((tr) => [...tr.children].map(cell)),
           sections: [...block.children].map((s) => s.localName)}
        : {[block.localName]: block.textContent});
}"""


def test_text_summary_markdown_cases(open_tab, grid_server):
    tab = open_tab(server=grid_server.url)
    summary = lambda text: tab.frame.evaluate(TEXT_SUMMARY, text)  # noqa: E731
    # Header, delimiter with alignments, escaped bars, bold, entities; short rows padded, long ones cut.
    blocks = summary(
        "| a | b | c |\n| :--- | :-: | ---: |\n| x \\| y | **z** w | &nbsp;&nbsp;1 |\n| only |\n| 1 | 2 | 3 | 4 |"
    )
    assert blocks == [{
        "table": [
            [["a", "cv-align-left", [], 0], ["b", "cv-align-center", [], 0], ["c", "cv-align-right", [], 0]],
            [["x | y", "cv-align-left", [], 0], ["z w", "cv-align-center", ["z"], 0],
             ["\u00a0\u00a01", "cv-align-right", [], 0]],
            [["only", "cv-align-left", [], 0], ["", "cv-align-center", [], 0], ["", "cv-align-right", [], 0]],
            [["1", "cv-align-left", [], 0], ["2", "cv-align-center", [], 0], ["3", "cv-align-right", [], 0]],
        ],
        "sections": ["thead", "tbody"],
    }]
    # Markup, escaped stars, a lone ** and unknown entities stay text.
    [block] = summary("| h |\n| --- |\n| <script>alert(1)</script> |\n| \\*\\*no\\*\\* |\n| a ** b |\n| &bogus; &lt;i&gt; |")
    assert [row[0][:3] for row in block["table"]] == [
        ["h", "", []], ["<script>alert(1)</script>", "", []], ["**no**", "", []], ["a ** b", "", []],
        ["&bogus; <i>", "", []],
    ]
    assert all(row[0][3] == 0 for row in block["table"])
    # Lines around a table stay preformatted; bar lines without a delimiter line are no table.
    assert summary("before\n  kept as is\n| t |\n|---|\n| v |\nafter **x**") == [
        {"pre": "before\n  kept as is"},
        {"table": [[["t", "", [], 0]], [["v", "", [], 0]]], "sections": ["thead", "tbody"]},
        {"pre": "after **x**"},
    ]
    assert summary("| a | b |\n| c | d |") == [{"pre": "| a | b |\n| c | d |"}]
    assert summary("| a | b |\n| --- |\n| c | d |") == [{"pre": "| a | b |\n| --- |\n| c | d |"}]


POINTING = "cnnvis/metrics/gradcam/features/pointing/gradcam/true"


def test_trends_draw_a_line_per_run_mark_the_step_and_a_click_picks_it(open_tab, demo_logdir, demo_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tab = open_tab("?p.cnnvis.kind=gradcam")
    frame = tab.frame
    chart = frame.locator(f".cv-trend[data-tag='{POINTING}']")
    chart.wait_for(timeout=30_000)
    assert chart.locator(".cv-trend-title").text_content() == "pointing"  # method and target are picked above it
    names = frame.locator("select").evaluate_all("lists => lists.map((l) => l.getAttribute('aria-label'))")
    assert "Trends image" in names and len(names) == len(set(names)), names  # every list named once (a11y, tests)
    assert frame.locator("select[aria-label='Trends method']").input_value() == "gradcam"
    assert frame.locator("select[aria-label='Trends target']").input_value() == "true"
    runs = chart.locator(".cv-trend-run").evaluate_all("groups => groups.map(g => g.dataset.run)")
    assert sorted(runs) == sorted([*demo_runs, HOSTILE_RUN])
    for run in demo_runs:  # every point is the value TensorBoard's own loader reads back
        acc = EventAccumulator(str(demo_logdir / run))
        acc.Reload()
        expected = [(e.step, e.value) for e in acc.Scalars(POINTING)]
        points = chart.locator(f".cv-trend-point[data-run='{run}']").evaluate_all(
            "points => points.map(p => [Number(p.dataset.step), Number(p.dataset.value)])")
        assert [s for s, _ in points] == [s for s, _ in expected]
        assert np.allclose([v for _, v in points], [v for _, v in expected])
    # The grid's step (the latest) is marked on every chart.
    latest = frame.locator("input[aria-label='Exact step']").input_value()
    markers = frame.locator(".cv-trend-marker").evaluate_all(
        "lines => lines.map(l => [l.dataset.step, l.getAttribute('visibility')])")
    assert len(markers) == frame.locator(".cv-trend").count() > 1
    assert set(map(tuple, markers)) == {(latest, "visible")}
    # Hovering a point of the run named like markup shows it as text; clicking a point moves the grid there.
    # (it is a copy of the first demo run: their points coincide, and the tooltip names both)
    first = chart.locator(f".cv-trend-point[data-run='{HOSTILE_RUN}']").first
    box = first.bounding_box()
    tab.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tooltip = frame.locator(".cv-tooltip")
    tooltip.wait_for(state="visible")
    step = first.get_attribute("data-step")
    assert sorted(tooltip.locator(".cv-run-name").all_text_contents()) == sorted([HOSTILE_RUN, demo_runs[0]])
    assert f"step {step} · " in tooltip.text_content()
    assert step != latest, "the check needs a point at another step"
    tab.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    frame.wait_for_function(
        "step => document.querySelector(\"input[aria-label='Exact step']\").value === step", arg=step)
    assert {m for m in frame.locator(".cv-trend-marker").evaluate_all("ls => ls.map(l => l.dataset.step)")} == {step}
    assert frame.locator(".cv-grid-steps .cv-step-head.cv-current").get_attribute("data-step") == step
    tab.wait_for_url_part(f"p.cnnvis.step={step}")
    assert tab.page.locator("img[src='x']").count() == 0 and frame.locator("img[src='x']").count() == 0
    # Another target: the charts follow the pick.
    frame.locator("select[aria-label='Trends target']").select_option("pred")
    frame.locator(f".cv-trend[data-tag='{POINTING.replace('/true', '/pred')}']").wait_for()


def test_trends_say_when_no_metric_was_logged(open_tab, custom_server):
    tab = open_tab(server=custom_server)
    note = tab.frame.locator(".cv-trends-card .cv-empty")
    note.wait_for(timeout=30_000)
    assert "No metrics logged yet" in note.text_content()


#: Per grid cell: run, step, panel key, caption text, and where the image lies in its slot (CSS pixels).
CROPPED_CELLS = """() => [...document.querySelectorAll('.cv-grid .cv-cell')].filter((c) => c.querySelector('img')).map((cell) => {
    const slot = cell.querySelector('.cv-thumb');
    const image = slot.querySelector('img');
    const [s, i] = [slot.getBoundingClientRect(), image.getBoundingClientRect()];
    return {run: slot.dataset.run, step: Number(slot.dataset.step), panel: slot.dataset.panel ?? null,
            cropped: slot.classList.contains('cv-cropped'), width: slot.clientWidth, natural: image.naturalWidth,
            left: i.left - s.left - slot.clientLeft, imageWidth: i.width,
            caption: [...cell.querySelectorAll('.cv-caption-line')].map((l) => l.textContent)};
})"""


def test_a_panel_alone_with_its_caption_as_text_and_every_panel_side_by_side(open_tab, demo_logdir, demo_runs):
    from _models import read_events, texts

    tab = open_tab(f"?p.cnnvis.kind=gradcam&p.cnnvis.hide={urllib.parse.quote(HOSTILE_RUN)}")
    frame = tab.frame
    panel = frame.locator("select[aria-label='Panel']")
    options = panel.locator("option").evaluate_all("os => os.map(o => [o.value, o.textContent])")
    assert options == [["", "whole picture"], ["input", "input"], ["gradcam/true", "Grad-CAM · true"],
                       ["gradcam/pred", "Grad-CAM · pred"], ["gradcam++/true", "Grad-CAM++ · true"],
                       ["gradcam++/pred", "Grad-CAM++ · pred"]]
    written = {}  # (run, step) -> the records the logger wrote for probe image 0
    for run in demo_runs:
        for step, text in texts(read_events(demo_logdir / run), tags.panels_tag("gradcam", "features") + "/text_summary"):
            written[(run, step)] = tags.parse_panels_text(text)[tags.probe_view(0)]
    panel.select_option("gradcam/pred")
    tab.wait_for_url_part("p.cnnvis.panel=gradcam%2Fpred")
    frame.wait_for_function(f"() => {{ const c = ({CROPPED_CELLS})(); return c.length > 0 && c.every((x) => x.cropped); }}")
    cells = frame.evaluate(CROPPED_CELLS)
    assert {c["run"] for c in cells} == set(demo_runs)
    for cell in cells:
        record = next(r for r in written[(cell["run"], cell["step"])] if r["key"] == "gradcam/pred")
        assert cell["panel"] == "gradcam/pred"
        assert cell["caption"] == record["text"] and record["text"][1].startswith("pred: ")
        x, _, w, _ = record["box"]
        scale = cell["width"] / w  # the panel's box fills the slot: the image starts x * scale to its left
        assert abs(cell["left"] + x * scale) < 1.5, (cell, record)
        assert abs(cell["imageWidth"] - cell["natural"] * scale) < 1.5
    # Every panel of the first run's picture at the current step, side by side, labelled and captioned as text.
    assert frame.locator(".cv-compare-panel").count() == 0  # folded: nothing loaded until opened
    frame.locator(".cv-compare-card > summary").click()
    tab.wait_for_url_part("p.cnnvis.compare=open")
    step = int(frame.locator("input[aria-label='Exact step']").input_value())
    compare = frame.locator(".cv-compare-panel")
    assert compare.evaluate_all("fs => fs.map(f => f.dataset.panel)") == [r["key"] for r in written[(demo_runs[0], step)]]
    assert frame.locator(".cv-compare-label").all_text_contents() == [r["label"] for r in written[(demo_runs[0], step)]]
    assert set(frame.locator(".cv-compare .cv-thumb").evaluate_all("ss => ss.map(s => s.dataset.step)")) == {str(step)}
    frame.locator("button[aria-label='Previous logged step']").click()
    earlier = int(frame.locator("input[aria-label='Exact step']").input_value())
    assert earlier < step
    assert set(frame.locator(".cv-compare .cv-thumb").evaluate_all("ss => ss.map(s => s.dataset.step)")) == {str(earlier)}
    captions = frame.locator(".cv-compare-panel").nth(4).locator(".cv-caption-line").all_text_contents()
    assert captions == written[(demo_runs[0], earlier)][4]["text"][1:]
    # Back to whole pictures: nothing cropped, no caption rows.
    panel.select_option("")
    frame.wait_for_function(f"() => ({CROPPED_CELLS})().every((x) => !x.cropped && x.caption.length === 0)")


#: Font size, box and overflow of every caption line the tab shows as text.
CAPTION_LINES = """() => [...document.querySelectorAll('.cv-caption-line')].map((line) => {
    const box = line.getBoundingClientRect();
    return {text: line.textContent, font: parseFloat(getComputedStyle(line).fontSize), height: box.height,
            clipped: line.scrollWidth > line.clientWidth + 0.5 || line.scrollHeight > line.clientHeight + 0.5};
})"""


@pytest.mark.parametrize("panel", ["gradcam/pred", "input"])
def test_captions_shown_as_text_are_legible_at_the_default_size(open_tab, panel):
    tab = open_tab(f"?p.cnnvis.kind=gradcam&p.cnnvis.panel={urllib.parse.quote(panel, safe='')}")
    frame = tab.frame
    frame.wait_for_function("() => document.querySelectorAll('.cv-grid .cv-caption-line').length > 0")
    lines = frame.evaluate(CAPTION_LINES)
    assert lines and all(line["text"] for line in lines)
    for line in lines:
        assert line["font"] >= 11 and line["height"] >= 11, line
        assert not line["clipped"], line
