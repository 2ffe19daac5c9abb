"""Make the README's screenshot of the CNN Vis tab from real runs.

    python examples/compare_runs.py --logdir runs/compare          # two demo runs, different learning rates
    python docs/screenshot.py --logdir runs/compare --out docs/tab.png
    python docs/screenshot.py --logdir runs/compare --out docs/trends.png --part trends
    python docs/screenshot.py --logdir runs/compare --out docs/panel.png \
        --query "?p.cnnvis.kind=gradcam&p.cnnvis.panel=gradcam%2Fpred&p.cnnvis.step=300"   # the default size

Starts TensorBoard on a free localhost port, opens the tab in Debian's headless chromium (through playwright),
waits until every image on screen has loaded, and saves a 1400×900 screenshot (``--part trends``: of the trends
card only).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/compare")
    p.add_argument("--out", default="docs/tab.png")
    p.add_argument("--query", default="?p.cnnvis.kind=gradcam&p.cnnvis.size=150",
                   help="the tab's view, as in its shareable URL")
    p.add_argument("--part", choices=("page", "trends"), default="page", help="the whole page or the trends card")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/cnnvis/index", timeout=5) as r:
                    if b"gradcam" in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("TensorBoard did not serve cnnvis data within 60 s")
            time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/{args.query}#cnnvis")
            frame = page.wait_for_selector('iframe[src*="name=cnnvis"]', timeout=30_000).content_frame()
            frame.wait_for_selector(".cv-grid-wrap", timeout=30_000)
            frame.wait_for_function(
                "() => [...document.querySelectorAll('.cv-thumb img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=60_000,
            )
            if args.part == "trends":
                frame.wait_for_selector(".cv-trend", timeout=30_000)
                frame.locator(".cv-trends-card").screenshot(path=args.out)
            else:
                page.screenshot(path=args.out)
            browser.close()
        print(f"saved {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
