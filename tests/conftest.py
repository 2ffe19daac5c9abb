"""Shared fixtures: real TensorBoard processes on free ports, a logdir of demo runs, and headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "train_shapes.py"
#: The demo runs every logging fixture starts from: (run name, seed). Short runs (6 steps, every kind
#: logged at steps 0, 3 and 6), trained side by side, one thread each.
DEMO_RUNS = (("seed0", 0), ("seed1", 1))
DEMO_STEPS = ("--steps", "6", "--every", "3")


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@dataclass(frozen=True)
class TensorBoardProcess:
    url: str  #: base URL, path prefix included
    log: Path  #: everything the process printed


class PortTaken(RuntimeError):
    """Another process bound the port between `free_port` and TensorBoard's own bind."""


def wait_until_serving(
    process: subprocess.Popen, address: str, url: str, log: Path, plugin: str | None, timeout: float
) -> None:
    """Returns once ``process`` serves ``url`` at ``address`` (and has ``plugin`` enabled); raises if it cannot."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = log.read_text()
            if "could not bind" in output:
                raise PortTaken(output)
            raise RuntimeError(f"tensorboard exited with {process.returncode}:\n{output}")
        # TensorBoard prints its address once it holds the port: only then is `url` surely ours.
        if f" at {address}/" in log.read_text():
            try:
                listing = get_json(f"{url}/data/plugins_listing", timeout=5)
                if plugin is None or listing.get(plugin, {}).get("enabled"):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensorboard on {url} not ready after {timeout} s:\n{log.read_text()}")
        time.sleep(0.25)


@pytest.fixture(scope="session")
def start_tensorboard(tmp_path_factory) -> Iterator[Callable[..., TensorBoardProcess]]:
    """Factory: ``start_tensorboard(logdir, *flags, plugin=None, prefix="")`` -> a running TensorBoard.

    Runs ``python -m tensorboard.main --logdir LOGDIR --port P --host 127.0.0.1 FLAGS`` on a free port
    (another one if that port gets taken meanwhile), waits until it serves (and, with ``plugin``, until
    ``/data/plugins_listing`` reports that plugin enabled, i.e. some of its data is loaded), and stops
    every process it started at the end of the session.
    """
    processes: list[subprocess.Popen] = []

    def start(
        logdir: Path, *flags: str, plugin: str | None = None, prefix: str = "", timeout: float = 60
    ) -> TensorBoardProcess:
        for _ in range(3):
            port = free_port()
            log_path = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
            command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
            command += ["--port", str(port), "--host", "127.0.0.1", *flags]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            address = f"http://127.0.0.1:{port}"
            url = address + prefix
            try:
                wait_until_serving(process, address, url, log_path, plugin, timeout)
            except PortTaken:
                continue
            return TensorBoardProcess(url, log_path)
        raise RuntimeError("three free ports in a row were taken before tensorboard could bind them")

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def settled_json(url: str, done: Callable[[object], bool], timeout: float = 60, settle: bool = True) -> object:
    """The JSON at ``url`` once ``done(answer)`` holds.

    With ``settle``, also wait until the answer stays the same over two polls half a second apart:
    TensorBoard loads runs in the background, one after another.
    """
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        answer = get_json(url)
        if done(answer) and (answer == previous or not settle):
            return answer
        previous = answer
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not settle in {timeout} s; last answer: {previous!r}")


@pytest.fixture(scope="session")
def wait_for_json() -> Callable[..., object]:
    """``wait_for_json(url, done, timeout=60, settle=True)``: see `settled_json`."""
    return settled_json


@pytest.fixture(scope="session")
def demo_logdir(tmp_path_factory) -> Path:
    """A logdir holding the demo's runs (see `DEMO_RUNS`); copy runs out of it rather than writing into it."""
    logdir = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    trainings = [
        subprocess.Popen(
            [sys.executable, str(DEMO), "--logdir", str(logdir), "--run-name", name, "--seed", str(seed), *DEMO_STEPS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, seed in DEMO_RUNS
    ]
    for training in trainings:
        output, _ = training.communicate(timeout=300)
        assert training.returncode == 0, output.decode(errors="replace")
    return logdir


# Headless Chromium (Debian's package, driven by playwright; no browser download).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if not CHROMIUM.exists():
        missing.append(str(CHROMIUM))
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: failing instead of skipping)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
