"""``python -m cnnvis_tb export``: one self-contained HTML page and an animated GIF from a log dir, without a server.

The page is opened in real Chromium (through Playwright) with every request but the page itself aborted; skipped
when Playwright or /usr/bin/chromium is missing, except under ``CI=true`` where that fails (the ``browser`` fixture
of conftest.py).
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from _models import TinyCNN, decode_png, image_at, make_batch, read_events, texts
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb import VisLogger, tags
from cnnvis_tb.__main__ import main

#: A run whose name is markup: it must show as text and run nothing.
HOSTILE_RUN = "<img src=x onerror=alert(1)>"
#: In natural order ("<" sorts before letters): the rows of the grid.
RUNS = [HOSTILE_RUN, "baseline"]
#: Logged steps of ``every=2`` over steps 0..4.
STEPS = [0, 2, 4]
LAYER = "body"
TAG = tags.image_tag("gradcam", LAYER, tags.probe_view(0))
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnvis_tb", "export", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """Two runs (one named with markup) of TinyCNN, gradcam + kernels logged at steps 0, 2, 4, with object boxes
    so that the CAM metrics exist."""
    root = tmp_path_factory.mktemp("export_logs")
    probe, labels = make_batch(2, n=2)
    boxes = [[0, 0, 8, 8], [4, 4, 16, 16]]
    for seed, run in enumerate(RUNS):
        torch.manual_seed(seed)
        model = TinyCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        with VisLogger(model, root / run, probe=probe, probe_labels=labels, kinds=["gradcam", "kernels"], every=2,
                       probe_boxes=boxes, layers={"gradcam": [LAYER]}, strict=True) as vis:
            for step in range(5):
                x, y = make_batch(10 + step)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                vis.step(step)
    return root


@pytest.fixture(scope="module")
def exported(logdir, tmp_path_factory):
    """The report, and the filmstrip of the second run, written by the command line as a program."""
    out = tmp_path_factory.mktemp("export_out")
    report, gif = out / "report.html", out / "film.gif"
    done = cli(logdir, "--kind", "gradcam", "--layer", LAYER, "--image", "0", "--out", report, "--gif", gif,
               "--run", "baseline")
    assert done.returncode == 0, done.stderr
    assert f"wrote {report} (6 images" in done.stdout
    assert f"wrote {gif} (3 frames" in done.stdout
    assert "reading run 'baseline' (2/2)" in done.stderr  # progress through logging
    assert "wrote" not in done.stderr  # the result is said once, on stdout
    return report, gif


def inlined(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


def test_the_page_is_self_contained_and_escapes_run_names(exported):
    page = exported[0].read_text(encoding="utf-8")
    assert HOSTILE_RUN not in page  # only its escaped form
    assert html_escaped(HOSTILE_RUN) in page
    assert "<script" not in page.lower()
    assert 'content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'"' in page  # none allowed
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing to fetch
    assert len(inlined(page)) == len(RUNS) * len(STEPS)
    assert page.count("<svg") >= 3  # trends charts of the CAM metrics


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_in_chromium_with_the_network_blocked(exported, logdir, browser):
    report, _ = exported
    url = report.as_uri()
    blocked, dialogs, errors = [], [], []
    # The page's own Content-Security-Policy would stop any request before the route sees it: bypass it here, so
    # that the route (which lets only the page itself through) sees every request the page would make.
    context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)

    def route(r):
        if r.request.url == url or r.request.url.startswith("data:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("() => [...document.images].every((i) => i.complete)", timeout=15_000)
    shown = page.evaluate("""() => [...document.querySelectorAll('img')].map((i) => ({
        run: i.closest('td').dataset.run, step: Number(i.closest('td').dataset.step), src: i.getAttribute('src'),
        size: [i.naturalWidth, i.naturalHeight]}))""")
    assert len([i for i in shown if i["size"][0] > 0]) == len(RUNS) * len(STEPS) == len(shown)
    assert sorted((i["run"], i["step"]) for i in shown) == sorted((r, s) for r in RUNS for s in STEPS)
    # The markup run name is text: no element was made of it, nothing ran, the row head reads it verbatim.
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert page.evaluate("""() => [...document.querySelectorAll('img')].filter((i) => i.getAttribute('src') === 'x'
        || i.hasAttribute('onerror')).length""") == 0
    assert page.locator("th.run").all_text_contents() == RUNS
    assert HOSTILE_RUN in page.locator(".legend").inner_text()
    # Captions as text under the pictures, from the panel records.
    captions = page.locator("figcaption").all_inner_texts()
    assert len(captions) == len(RUNS) * len(STEPS)
    assert all("Grad-CAM · true: true: class" in c and "input: true: class" in c for c in captions)
    assert page.locator(".chart svg polyline").count() >= len(RUNS)
    assert "pointing/gradcam/true" in page.locator(".chart h3").all_text_contents()
    # One picture, as the page decoded it and as its data: URI holds it, equals the event file's.
    acc = read_events(logdir / HOSTILE_RUN)
    one = next(i for i in shown if i["run"] == HOSTILE_RUN and i["step"] == 2)
    expected = image_at(acc, TAG, 2)
    assert one["size"] == [expected.shape[1], expected.shape[0]]
    np.testing.assert_array_equal(decode_png(base64.b64decode(one["src"].split(",", 1)[1])), expected)
    page.wait_for_timeout(200)
    context.close()
    assert blocked == [] and dialogs == [] and errors == []


def test_gif_has_one_frame_per_logged_step_with_its_number(exported):
    _, gif = exported
    with Image.open(gif) as film:
        assert film.n_frames == len(STEPS)
        assert film.info.get("loop") == 0 and film.info.get("duration") == 500
        frames = []
        for i in range(film.n_frames):
            film.seek(i)
            frames.append(np.asarray(film.convert("RGB")))
    assert len({f.shape for f in frames}) == 1
    bands = [f[:20] for f in frames]  # the white band with "step N"
    assert all((b == 255).mean() > 0.5 for b in bands)
    for a in range(len(frames)):
        for b in range(a + 1, len(frames)):
            assert not np.array_equal(bands[a], bands[b]), "step numbers differ frame to frame"


def test_panel_is_cut_out_with_its_record_and_captioned(logdir, tmp_path, capsys):
    out = tmp_path / "panel.html"
    assert main(["export", str(logdir), "--kind", "gradcam", "--layer", LAYER, "--image", "1", "--panel",
                 "gradcam/true", "--out", str(out), "-q"]) == 0
    page = out.read_text(encoding="utf-8")
    acc = read_events(logdir / RUNS[0])
    records = dict(texts(acc, tags.panels_tag("gradcam", LAYER) + "/text_summary"))
    panel = next(p for p in tags.parse_panels_text(records[0])[tags.probe_view(1)] if p["key"] == "gradcam/true")
    x, y, w, h = panel["box"]
    strip = image_at(acc, tags.image_tag("gradcam", LAYER, tags.probe_view(1)), 0)
    np.testing.assert_array_equal(decode_png(inlined(page)[0]), strip[y:y + h, x:x + w])  # first run, step 0
    assert all(f"<div>{html_escaped(line)}</div>" in page for line in panel["text"])
    assert "energy/gradcam/true" in page and "gradcam++" not in page.split("Trends", 1)[1]
    assert "wrote" in capsys.readouterr().out


def test_views_other_than_probe_images(logdir, tmp_path, capsys):
    out = tmp_path / "kernels.html"
    assert main(["export", str(logdir), "--kind", "kernels", "--layer", "stem.0", "--view", "grid", "--out",
                 str(out), "-q"]) == 0
    page = out.read_text(encoding="utf-8")
    assert len(inlined(page)) == len(RUNS) * len(STEPS)
    assert "<svg" not in page  # no metrics for kernels
    acc = read_events(logdir / RUNS[0])
    np.testing.assert_array_equal(decode_png(inlined(page)[len(STEPS) - 1]),
                                  image_at(acc, tags.image_tag("kernels", "stem.0", "grid"), STEPS[-1]))


@pytest.mark.parametrize("args, expected", [
    (["--kind", "nope", "--layer", LAYER, "--image", "0"], "available kinds: gradcam, kernels"),
    (["--kind", "gradcam", "--layer", "nope", "--image", "0"], "available layers: body"),
    (["--kind", "kernels", "--layer", "nope", "--view", "grid"], "available layers: body.0, body.3, stem.0"),
    (["--kind", "gradcam", "--layer", LAYER, "--image", "7"], "available: --image 0, 1"),
    (["--kind", "gradcam", "--layer", LAYER, "--view", "grid"], "available: --image 0, 1"),
    (["--kind", "gradcam", "--layer", LAYER], "choose one: --image 0, 1"),
    (["--kind", "kernels", "--layer", "stem.0", "--view", "nope"], "available: --view grid"),
    (["--kind", "gradcam", "--layer", LAYER, "--image", "0", "--run", "nope"],
     f"available runs: '{HOSTILE_RUN}', 'baseline'"),
    (["--kind", "gradcam", "--layer", LAYER, "--image", "0", "--panel", "nope"],
     "available panels: input, gradcam/true, gradcam/pred, gradcam++/true, gradcam++/pred"),
    (["--kind", "kernels", "--layer", "stem.0", "--panel", "x"], "writes no panel records"),
    ([], "available kinds: gradcam, kernels"),
])
def test_bad_input_lists_what_is_there(logdir, tmp_path, capsys, args, expected):
    out = tmp_path / "never.html"
    assert main(["export", str(logdir), *args, "--out", str(out), "--gif", str(tmp_path / "never.gif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m cnnvis_tb export: error: ") or "\npython -m cnnvis_tb export: error: " in err
    assert expected in err
    assert not out.exists()


def test_bad_input_and_empty_log_dirs_exit_with_status_2(logdir, tmp_path):
    done = cli(logdir, "--kind", "nope", "--out", tmp_path / "r.html")
    assert done.returncode == 2 and "available kinds: gradcam, kernels" in done.stderr
    (tmp_path / "empty").mkdir()
    done = cli(tmp_path / "empty", "--kind", "gradcam", "--out", tmp_path / "r.html")
    assert done.returncode == 2 and "holds no event files" in done.stderr
    with SummaryWriter(tmp_path / "plain" / "run") as writer:  # event files, but nothing of cnnvis_tb
        writer.add_scalar("loss", 1.0, 0)
    done = cli(tmp_path / "plain", "--out", tmp_path / "r.html")
    assert done.returncode == 2 and "holds no cnnvis pictures (runs: 'run')" in done.stderr
    done = cli(tmp_path / "missing", "--out", tmp_path / "r.html")
    assert done.returncode == 2 and "no such log dir" in done.stderr
    done = cli(logdir, "--kind", "gradcam", "--layer", LAYER, "--image", "0")
    assert done.returncode == 2 and "nothing to write" in done.stderr
    done = cli(logdir, "--kind", "gradcam")  # no output asked for: the layers are listed all the same
    assert done.returncode == 2 and "choose a layer of gradcam with --layer" in done.stderr
    assert not (tmp_path / "r.html").exists()
    assert "Traceback" not in done.stderr


def test_the_gif_alone_of_the_default_run(logdir, tmp_path, capsys):
    gif = tmp_path / "kernels.gif"
    assert main(["export", str(logdir), "--kind", "kernels", "--layer", "body.0", "--gif", str(gif),
                 "--duration", "120", "-q"]) == 0
    assert f"frames of run '{HOSTILE_RUN}', 120 ms each" in capsys.readouterr().out
    with Image.open(gif) as film:
        assert film.n_frames == len(STEPS) and film.info["duration"] == 120
    first = Image.open(io.BytesIO(gif.read_bytes()))
    assert first.width >= 128 or first.height >= 128  # small pictures are upscaled for slides


def test_a_probe_without_labels_gets_the_predicted_class_trends(tmp_path):
    """Without probe labels only the predicted class's metrics exist; the report charted the true class's, so
    none (``0 charts``)."""
    from cnnvis_tb import export as exporting

    torch.manual_seed(0)
    probe, _ = make_batch(4, n=4)
    with VisLogger(TinyCNN(), tmp_path / "run", probe=probe, kinds=["gradcam"], every=1, strict=True) as vis:
        for step in range(2):
            vis.step(step)
    selection = exporting.select(tmp_path, "gradcam", "body", image=0)
    assert selection.metrics and all(s.name.endswith("/pred") or "/" not in s.name for s in selection.metrics)
    assert any(s.name.startswith("deletion/") for s in selection.metrics)
