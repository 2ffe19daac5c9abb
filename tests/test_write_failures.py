"""Writing fails mid-run (file-size limit, the folder removed, a dead writer thread): training always goes on."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _models import TinyCNN, make_batch, read_events
from torch import nn

from cnnvis_tb import VisLogger

TESTS = Path(__file__).resolve().parent
#: TensorBoard's own writer thread dies with the error (and prints it); the logger's answer is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

#: A training loop that logs every step; the file-size limit is set after step 0 is written.
SCRIPT = textwrap.dedent("""
    import resource, signal, sys, warnings
    import torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from _models import TinyCNN, make_batch
    from cnnvis_tb import VisLogger

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action of SIGXFSZ kills the process
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe, labels = make_batch(0, n=2)
    vis = VisLogger(model, {log_dir!r}, probe=probe, probe_labels=labels, every=1, strict={strict},
                    kinds=["gradcam", "features", "kernels", "histograms"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            x, y = make_batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            vis.step(step)
            if step == 0:
                size = sum(p.stat().st_size for p in __import__("pathlib").Path({log_dir!r}).iterdir())
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20000, size + 20000))
        vis.close()
    print("trained", step + 1, "steps")
    for w in caught:
        if "cnnvis_tb" in str(w.message):
            print("WARNING", w.message)
""")


def _run(tmp_path, strict: bool) -> subprocess.CompletedProcess:
    log_dir = str(tmp_path / "run")
    script = SCRIPT.format(tests=str(TESTS), log_dir=log_dir, strict=strict)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_a_file_size_limit_warns_once_and_training_completes(tmp_path):
    done = _run(tmp_path, strict=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 8 steps" in done.stdout
    ours = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(ours) == 1, done.stdout
    assert str(tmp_path / "run") in ours[0] and "File too large" in ours[0] and "training continues" in ours[0]
    acc = read_events(tmp_path / "run")  # what was written before the limit stays readable
    assert 0 in [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")]


def test_a_file_size_limit_raises_under_strict(tmp_path):
    done = _run(tmp_path, strict=True)
    assert done.returncode != 0
    assert "OSError" in done.stderr and "File too large" in done.stderr
    assert "trained" not in done.stdout


def _train_with(vis, model, steps=4, between=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x, y = make_batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert vis.step(step) == (step == 0)  # nothing more is logged once writing failed
            if step == 0 and between is not None:
                between()
        vis.close()
        vis.close()  # twice: never raises
    return [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]


def test_a_dead_writer_thread_warns_once_and_training_completes(tmp_path):
    model = TinyCNN()
    probe, labels = make_batch(1, n=2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=["gradcam", "kernels"],
                    async_logging=False)  # each step's write on this thread (async: tests/test_async_logging.py)

    def disk_full(_data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fill_the_disk():
        vis.writer._get_file_writer().event_writer._async_writer._writer.write = disk_full

    ours = _train_with(vis, model, between=fill_the_disk)
    assert len(ours) == 1 and "No space left on device" in ours[0] and str(tmp_path) in ours[0]
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")] == [0]


def test_a_background_kinds_failed_write_stops_logging_once_like_a_logging_steps(tmp_path):
    """Work a kind finishes on a thread of its own (as background activation maximization and DeepDream do, through
    ``ctx.info.open_output``) that fails to write warns once and stops the logger, as a logging step's write does,
    instead of raising into that thread."""
    import threading

    from cnnvis_tb.kinds import Kind

    gate, failures = threading.Event(), []

    class Later(Kind):
        name, label, every, layer_role = "later", "Later", 1, None

        def log(self, ctx, out, computed):
            if ctx.step:
                return
            info, step = ctx.info, ctx.step

            def finish():
                assert gate.wait(10)
                try:
                    with info.open_output(self, step) as later:
                        later.scalar("x", "value", 1.0)
                except Exception as e:
                    failures.append(e)

            self.thread = threading.Thread(target=finish)
            self.thread.start()

    def disk_full(_data):
        raise OSError(errno.ENOSPC, "No space left on device")

    kind = Later()
    model = TinyCNN()
    probe, labels = make_batch(1, n=2)
    vis = VisLogger(model, tmp_path, probe=probe, probe_labels=labels, every=1, kinds=["kernels", kind])

    def fill_the_disk_then_finish():
        vis.wait()  # step 0 is written
        vis.writer._get_file_writer().event_writer._async_writer._writer.write = disk_full
        gate.set()
        kind.thread.join(10)
        assert vis._stopped

    ours = _train_with(vis, model, between=fill_the_disk_then_finish)
    assert failures == []
    assert len(ours) == 1 and "No space left on device" in ours[0]
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")] == [0]


def test_the_log_dir_removed_mid_run_warns_once_and_training_completes(tmp_path):
    model = TinyCNN()
    probe, labels = make_batch(2, n=2)
    log_dir = tmp_path / "gone"
    vis = VisLogger(model, log_dir, probe=probe, probe_labels=labels, every=1, kinds=["gradcam", "kernels"])
    ours = _train_with(vis, model, between=lambda: shutil.rmtree(log_dir))
    assert len(ours) == 1 and str(log_dir) in ours[0] and "FileNotFoundError" in ours[0]


def test_the_log_dir_made_read_only_mid_run(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: root writes into a read-only folder, so this failure cannot be simulated")
    model = TinyCNN()
    probe, labels = make_batch(3, n=2)
    vis = VisLogger(model, tmp_path / "ro", probe=probe, every=1, kinds=["kernels"])
    try:
        ours = _train_with(vis, model, between=lambda: [p.chmod(0o444) for p in (tmp_path / "ro").iterdir()])
    finally:
        for p in (tmp_path / "ro").iterdir():
            p.chmod(0o644)
    assert len(ours) == 1 and "PermissionError" in ours[0]
