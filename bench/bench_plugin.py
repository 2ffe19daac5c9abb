"""How fast the "CNN Vis" plugin answers, and how many images the tab's first screen asks for.

    python bench/bench_plugin.py                          # 10 runs x 200 steps x 20 image tags
    python bench/bench_plugin.py --runs 50 --steps 1000   # the scale figure
    python bench/bench_plugin.py --python-loader          # also time --load_fast=false
    python bench/bench_plugin.py --quick --json rows.json  # a smoke run, figures for bench/run_all.py

Writes synthetic cnnvis logs (tiny PNGs straight into event files, no model, no torch), starts the
real ``tensorboard`` on 127.0.0.1 (TensorBoard's default Rust data server; optionally also the Python
loader), times each JSON route over HTTP (median of several calls) and, when Playwright and
/usr/bin/chromium are there, counts the image requests of the tab's first screen against the images
it shows. Target: every index route under 0.3 s.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from cnnvis_tb import tags

TARGET_SECONDS = 0.3
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
PNG_SIDE = 8

#: Same measure as tests/test_plugin_browser.py: image slots at least partly inside the viewport and
#: inside the grid's scrolling box, and all slots.
SLOTS_ON_SCREEN = """() => {
    let onScreen = 0;
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
        if (right > left && bottom > top) onScreen += 1;
    }
    return {onScreen, total: slots.length};
}"""
IMAGES_SETTLED = """() => {
    const images = [...document.querySelectorAll('.cv-thumb img')];
    return images.length > 0 && images.every((image) => image.complete);
}"""


def image_tags(count: int) -> list[str]:
    """``count`` cnnvis image tags over the kinds, as a VisLogger run with several probe images writes them."""
    fixed = [
        tags.image_tag("kernels", "conv1", "grid"),
        tags.image_tag("kernels", "layer1.0.conv1", "grid"),
        tags.image_tag("actmax", "layer3.1.conv2", "channels"),
        tags.image_tag("actmax", "layer4.1.conv2", "channels"),
    ]
    per_probe = (("gradcam", "layer4"), ("features", "layer3.1.conv2"))
    probes = (tags.image_tag(kind, layer, tags.probe_view(p)) for p in itertools.count() for kind, layer in per_probe)
    return fixed[:count] + list(itertools.islice(probes, max(0, count - len(fixed))))


def tiny_pngs(count: int = 16) -> list[bytes]:
    pngs = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (PNG_SIDE, PNG_SIDE), (i * 16 % 256, 255 - i * 16 % 256, 128)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def run_names(count: int) -> list[str]:
    return [f"run_{r:03d}" for r in range(count)]


def write_logs(logdir: Path, runs: int, steps: int, tag_count: int) -> tuple[list[str], list[str]]:
    """Event files as ``SummaryWriter.add_image`` writes them, ``steps`` logged steps per tag."""
    pngs = tiny_pngs()
    all_tags = image_tags(tag_count)
    names = run_names(runs)
    for r, name in enumerate(names):
        writer = EventFileWriter(str(logdir / name), max_queue_size=1000, flush_secs=120)
        for step in range(steps):
            values = [
                summary_pb2.Summary.Value(
                    tag=tag,
                    image=summary_pb2.Summary.Image(
                        height=PNG_SIDE, width=PNG_SIDE, colorspace=3, encoded_image_string=pngs[(r + step + t) % 16]
                    ),
                )
                for t, tag in enumerate(all_tags)
            ]
            writer.add_event(
                event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
            )
        writer.close()
    return names, all_tags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def start_tensorboard(logdir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"]
        + list(flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_until_loaded(url: str, runs: list[str], last_tag: str, steps: int, timeout: float) -> float:
    """Seconds until every run's last tag holds all its steps (TensorBoard loads in the background)."""
    start = time.monotonic()
    query = urllib.parse.urlencode({"tag": last_tag})
    while time.monotonic() - start < timeout:
        try:
            answer = json.loads(get(f"{url}/data/plugin/cnnvis/steps?{query}"))
            if len(answer["runs"]) == len(runs) and all(len(r["steps"]) == steps for r in answer["runs"]):
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not load {len(runs)} runs x {steps} steps in {timeout} s")


def time_route(url: str, repeat: int) -> tuple[list[float], int]:
    """Seconds of each of ``repeat`` GETs of ``url`` (the first one may fill a cache), and the answer size."""
    timings, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = len(get(url))
        timings.append(time.perf_counter() - start)
    return timings, size


def first_screen(url: str) -> tuple[int, int, int, float] | None:
    """(image requests, images on screen, image slots in the page, seconds until they showed)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not CHROMIUM.exists():
        return None
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("request", lambda r: "/data/plugin/cnnvis/image?" in r.url and requests.append(r.url))
        start = time.perf_counter()
        page.goto(f"{url}/#cnnvis")
        frame = page.wait_for_selector('iframe[src*="name=cnnvis"]', timeout=60_000).content_frame()
        frame.wait_for_selector(".cv-grid-wrap", timeout=60_000)
        frame.wait_for_function(IMAGES_SETTLED, timeout=60_000)
        seconds = time.perf_counter() - start
        page.wait_for_timeout(500)
        slots = frame.evaluate(SLOTS_ON_SCREEN)
        browser.close()
    return len(requests), slots["onScreen"], slots["total"], seconds


def row(figure: str, value: str, target: str = "", passed: bool | None = None) -> dict[str, object]:
    """One reported figure, in the form bench/run_all.py collects (``passed`` None: context only)."""
    return {"figure": figure, "value": value, "target": target, "passed": passed}


def bench(logdir: Path, runs: list[str], all_tags: list[str], steps: int, flags: tuple[str, ...], args) -> list[dict]:
    """Times the routes of one TensorBoard process (and counts its first screen); returns the figures."""
    process, url = start_tensorboard(logdir, *flags)
    loader = "--load_fast=false" if flags else "rust data server"
    try:
        load_seconds = wait_until_loaded(url, runs, all_tags[-1], steps, args.timeout)
        tag = all_tags[len(all_tags) // 2]
        routes = {
            "/index": f"{url}/data/plugin/cnnvis/index",
            "/steps?tag=": f"{url}/data/plugin/cnnvis/steps?{urllib.parse.urlencode({'tag': tag})}",
            "/image?run=&tag=&step=": f"{url}/data/plugin/cnnvis/image?"
            + urllib.parse.urlencode({"run": runs[-1], "tag": tag, "step": steps // 2}),
            "/text?run=": f"{url}/data/plugin/cnnvis/text?{urllib.parse.urlencode({'run': runs[0]})}",
            "/data/plugins_listing (is_active)": f"{url}/data/plugins_listing",
        }
        print(f"\n{loader}: all steps loaded {load_seconds:.1f} s after start")
        print(f"{'route':36} {'first':>9} {'median':>9} {'min':>9} {'max':>9} {'bytes':>10}")
        rows = []
        for name, route_url in routes.items():
            (first, *timings), size = time_route(route_url, args.repeat + 1)
            median = statistics.median(timings)
            print(
                f"{name:36} {first * 1e3:7.1f}ms {median * 1e3:7.1f}ms {min(timings) * 1e3:7.1f}ms"
                f" {max(timings) * 1e3:7.1f}ms {size:10,}"
            )
            target = f"< {TARGET_SECONDS * 1e3:.0f} ms"
            rows.append(
                row(f"{name} answer, median ({loader})", f"{median * 1e3:.1f} ms", target, median < TARGET_SECONDS)
            )
            if name.startswith("/steps"):  # the first call reads every step; later ones reuse it
                rows.append(row(f"{name} first answer ({loader})", f"{first * 1e3:.1f} ms"))
        screen = None if args.no_browser else first_screen(url)
        if screen is None:
            print("first screen: not measured (needs playwright and /usr/bin/chromium)")
        else:
            requested, shown, slots, seconds = screen
            print(
                f"first screen: {requested} image requests for {shown} images on screen"
                f" ({slots:,} slots in the page), shown {seconds:.1f} s after opening TensorBoard"
            )
            figure = f"first screen: image requests / images on screen ({loader})"
            rows.append(row(figure, f"{requested} / {shown}", "requests ≤ images shown", requested <= shown))
        return rows
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="logged steps per image tag")
    parser.add_argument("--tags", type=int, default=20, help="image tags per run")
    parser.add_argument("--repeat", type=int, default=7, help="calls per route after the first (median reported)")
    parser.add_argument("--python-loader", action="store_true", help="also time tensorboard --load_fast=false")
    parser.add_argument("--no-browser", action="store_true", help="skip the first-screen count")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for TensorBoard to load")
    parser.add_argument(
        "--logdir", type=Path, help="write the logs here and keep them for the next run (default: a temp dir)"
    )
    parser.add_argument("--quick", action="store_true", help="4 runs x 50 steps x 8 tags, 3 calls per route")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file (bench/run_all.py)")
    parser.add_argument(
        "--threads", type=int, help="ignored: the plugin side runs no torch (accepted so run_all can pass it)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.tags, args.repeat = 4, 50, 8, 3

    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="cnnvis_bench_"))
    shape = {"runs": args.runs, "steps": args.steps, "tags": args.tags}
    marker = logdir / "bench.json"
    try:
        start = time.perf_counter()
        if marker.exists() and json.loads(marker.read_text()) == shape:
            runs, all_tags = run_names(args.runs), image_tags(args.tags)
            written = "reused from an earlier run"
        else:
            runs, all_tags = write_logs(logdir, args.runs, args.steps, args.tags)
            marker.write_text(json.dumps(shape))
            written = f"written in {time.perf_counter() - start:.1f} s"
        images = args.runs * args.steps * args.tags
        print(
            f"cnnvis plugin bench: {args.runs} runs x {args.steps} steps x {args.tags} image tags = {images:,} images"
            f" ({written}); per route: the first call, then the median of {args.repeat} more"
        )
        rows = [row("logs", f"{args.runs} runs × {args.steps} steps × {args.tags} image tags")]
        rows += bench(logdir, runs, all_tags, args.steps, (), args)
        if args.python_loader:
            rows += bench(logdir, runs, all_tags, args.steps, ("--load_fast=false",), args)
        verdict = "met" if all(r["passed"] is not False for r in rows) else "MISSED"
        print(f"\ntarget (routes < {TARGET_SECONDS * 1e3:.0f} ms, no image requested off screen): {verdict}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return rows
    finally:
        if args.logdir is None:
            shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
