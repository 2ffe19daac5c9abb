"""Asynchronous logging (``VisLogger(async_logging=True)``): the training thread runs the model work of a logging step,
one worker renders, encodes and writes. Same events as synchronous logging, bounded, strict / warn-once kept,
nothing lost at close, at interpreter exit, or (beyond the steps in flight) at a SIGKILL."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import TinyCNN, decode_png, make_batch, read_events, texts, tiny_logger
from torch import nn

from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import ALL_KINDS, BUILTIN, DeepDream, Kind, Needs
from cnnvis_tb.kinds.saliency import SALIENCY_METHODS

TESTS = Path(__file__).resolve().parent
#: CAM methods of every sort: gradient ones, a perturbation one (forwards in compute), FullGrad (bias gradients), CAM.
CAM_SOME = ("gradcam", "gradcam++", "scorecam", "fullgrad", "cam")


@pytest.fixture
def one_thread():
    """Tiny tensors on a busy 2-core machine: one intra-op thread is several times faster (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SlowKind(Kind):
    """A kind whose ``log`` takes ``seconds`` (or waits for ``gate``), records on which thread and when it ran."""

    name, label, every = "slow", "Slow", 1
    layer_role = None
    log_in_background = True

    def __init__(self, seconds: float = 0.0, gate: threading.Event | None = None, fail: type | None = None):
        super().__init__()
        self.seconds, self.gate, self.fail = seconds, gate, fail
        self.started, self.finished = threading.Event(), threading.Event()
        self.threads: list[str] = []
        self.logged: list[int] = []
        self.computed: list[int] = []

    def compute(self, ctx):
        self.computed.append(ctx.step)
        return ctx.step

    def log(self, ctx, out, computed):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
            self.gate.clear()
        time.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail("slow kind failed on purpose")
        out.scalar("x", "step", float(computed))
        self.logged.append(ctx.step)
        self.finished.set()


class ForegroundKind(SlowKind):
    """The same kind without the opt-in: its ``log`` runs on the training thread."""

    name = "fore"
    log_in_background = False


def _run(log_dir, *, async_logging: bool, steps: int = 3, gate: bool = False) -> None:
    """Train TinyCNN, logging every kind at every step (called between backward and the optimizer step); in place:
    optimizer step, gradients zeroed in place, a train-mode forward (BatchNorm buffers). With ``gate`` the worker
    renders each step only after the training step that follows it changed all of those."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe, labels = make_batch(99)
    kinds = [k for k in ALL_KINDS if k != "deepdream"] + [DeepDream(octaves=2, steps=2)]
    vis = VisLogger(model, log_dir, probe=probe, probe_labels=labels, every=1, kinds=kinds, strict=True,
                    actmax_steps=2, actmax_channels=2, saliency_methods=SALIENCY_METHODS,
                    cam_methods=CAM_SOME, cam_metrics="all", probe_boxes=[[2, 2, 10, 12]] * len(labels),
                    async_logging=async_logging)
    released = threading.Event()
    if gate:
        render = vis._log_later

        def delayed(ctx, later):
            assert released.wait(30)
            released.clear()
            render(ctx, later)

        vis._log_later = delayed
    for step in range(steps):
        x, y = make_batch(step)
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        vis.step(step)
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients the logging step saw, zeroed in place
        with torch.no_grad():
            model(x)  # BatchNorm running statistics move in place
        released.set()
    vis.close()


def _events(log_dir) -> dict[str, object]:
    acc = read_events(log_dir)
    tags = acc.Tags()
    out: dict[str, object] = {}
    for tag in tags["images"]:
        out["image:" + tag] = [(e.step, decode_png(e.encoded_image_string)) for e in acc.Images(tag)]
    for tag in tags["scalars"]:
        out["scalar:" + tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in tags["histograms"]:
        out["hist:" + tag] = [(e.step, e.histogram_value) for e in acc.Histograms(tag)]
    for tag in tags["tensors"]:
        out["text:" + tag] = texts(acc, tag)
    return out


def test_events_identical_with_async_on_and_off_for_every_builtin_kind(tmp_path, one_thread):
    _run(tmp_path / "sync", async_logging=False)
    _run(tmp_path / "async", async_logging=True, gate=True)
    sync, asyn = _events(tmp_path / "sync"), _events(tmp_path / "async")
    assert sync.keys() == asyn.keys()
    for name in BUILTIN:
        assert any(key.split(":")[1].startswith(f"cnnvis/{name}/") or f"/{name}/" in key for key in sync), name
    for key, expected in sync.items():
        got = asyn[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, a), (_, b) in zip(got, expected, strict=True):
            if isinstance(a, np.ndarray):
                assert np.array_equal(a, b), key
            else:
                assert a == b, key


def test_builtin_kinds_log_in_background_and_user_kinds_opt_in():
    assert all(cls.log_in_background for cls in BUILTIN.values())
    assert Kind.log_in_background is False


def test_step_returns_while_the_worker_renders_and_close_waits(tmp_path):
    slow = SlowKind(seconds=0.5)
    vis = tiny_logger(tmp_path, kinds=["features", slow], async_logging=True)
    start = time.perf_counter()
    assert vis.step(0)
    blocked = time.perf_counter() - start
    assert blocked < 0.2, blocked
    assert vis._worker.pending == 1 and not slow.finished.is_set()  # still rendering after step() returned
    vis.close()
    assert slow.finished.is_set()
    assert slow.threads == ["cnnvis-log"]
    acc = read_events(tmp_path)
    assert [e.value for e in acc.Scalars("cnnvis/metrics/slow/x/step")] == [0.0]
    assert [e.step for e in acc.Images("cnnvis/features/stem.0/probe_000")] == [0]
    assert set(vis.last_worker_times) == {"features", "slow"} and vis.last_worker_times["slow"] >= 0.5
    assert set(vis.last_times) == {"features", "slow"} and vis.last_times["slow"] < 0.2


def test_a_kind_without_the_opt_in_logs_on_the_training_thread(tmp_path):
    fore, back = ForegroundKind(), SlowKind()
    with tiny_logger(tmp_path, kinds=[fore, back], async_logging=True) as vis:
        vis.step(0)
        vis.step(1)
    assert fore.threads == [threading.current_thread().name] * 2
    assert back.threads == ["cnnvis-log"] * 2
    acc = read_events(tmp_path)
    assert len(acc.Scalars("cnnvis/metrics/fore/x/step")) == len(acc.Scalars("cnnvis/metrics/slow/x/step")) == 2


def test_bounded_the_next_logging_step_waits_for_the_worker(tmp_path):
    gate = threading.Event()
    slow = SlowKind(gate=gate)
    vis = tiny_logger(tmp_path, kinds=[slow], async_logging=True, max_pending=1)
    vis.step(0)
    assert slow.started.wait(10)
    second = threading.Thread(target=vis.step, args=(1,))
    second.start()
    deadline = time.monotonic() + 10
    while vis._worker.waits == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vis._worker.waits == 1  # step 1 is waiting for the worker ...
    time.sleep(0.1)
    assert second.is_alive() and slow.computed == [0] and vis._worker.pending == 1  # ... before its own work
    gate.set()  # step 0's log finishes
    second.join(10)
    assert not second.is_alive() and slow.logged[:1] == [0] and slow.computed == [0, 1]
    gate.set()
    vis.close()
    assert slow.logged == [0, 1]


def test_max_pending_two_lets_two_steps_be_in_flight(tmp_path):
    gate = threading.Event()
    slow = SlowKind(gate=gate)
    vis = tiny_logger(tmp_path, kinds=[slow], async_logging=True, max_pending=2)
    vis.step(0)
    vis.step(1)  # does not wait: two in flight
    assert vis._worker.waits == 0 and vis._worker.pending == 2
    for _ in range(2):
        gate.set()
        time.sleep(0.05)
    vis.close()
    assert slow.logged == [0, 1]


def test_a_kind_on_the_training_thread_does_not_wait_for_the_workers_rendering(tmp_path):
    """The worker holds the write lock for its writes alone: with two steps allowed in flight, a user kind that
    logs on the training thread renders and writes while the worker is still rendering the step before (it waited
    for that whole job when the lock was held around the rendering)."""
    gate = threading.Event()
    slow, fore = SlowKind(gate=gate), ForegroundKind()
    vis = tiny_logger(tmp_path, kinds=[slow, fore], async_logging=True, max_pending=2)
    vis.step(0)
    fore.logged.clear()
    assert slow.started.wait(10)  # the worker renders step 0 until the gate opens
    done = threading.Thread(target=vis.step, args=(1,))
    done.start()
    done.join(10)
    alive, logged = done.is_alive(), list(fore.logged)
    gate.set()
    done.join(10)
    assert slow.finished.wait(10)  # step 0's log is done (it cleared the gate) ...
    gate.set()  # ... and step 1's may go on
    vis.close()
    assert not alive and logged == [1]
    acc = read_events(tmp_path)
    assert [e.value for e in acc.Scalars("cnnvis/metrics/fore/x/step")] == [0.0, 1.0]
    assert [e.value for e in acc.Scalars("cnnvis/metrics/slow/x/step")] == [0.0, 1.0]


def _records_locked(vis) -> list[tuple[str, bool]]:
    """Patch the event file writer: each record's tags, and whether the write lock was held when it was written."""
    file_writer = vis.writer._get_file_writer()
    real = file_writer.add_summary
    written: list[tuple[str, bool]] = []

    def add_summary(summary, *args, **kwargs):
        written.extend((v.tag, vis._write_lock.locked()) for v in summary.value)
        return real(summary, *args, **kwargs)

    file_writer.add_summary = add_summary
    return written


@pytest.mark.parametrize("async_logging", [True, False])
def test_writer_calls_of_a_kind_take_their_values_at_the_call_and_are_written_at_its_end(tmp_path, async_logging):
    """What a kind writes through ``out.writer`` (histograms, a user's own add_* calls, a raw summary through its
    file writer) is written after its rendering, with its pictures, in order and under the write lock, with the
    values it had at the call (a reused buffer writes each value once). ``out.writer`` is still a SummaryWriter,
    and other attributes pass through."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import scalar

    seen: list[tuple[str, bool]] = []

    class Direct(SlowKind):
        name = "direct"

        def log(self, ctx, out, computed):
            buffer = torch.zeros(50)
            for i in range(3):  # one scratch buffer for every layer
                buffer.fill_(float(i))
                out.writer.add_scalar(f"own/s{i}", buffer[0], ctx.step)
                out.writer.add_histogram(f"own/h{i}", buffer, ctx.step)
            out.writer._get_file_writer().add_summary(scalar("own/raw", 7.0), ctx.step)
            seen.append(("log_dir", out.writer.log_dir == str(tmp_path)))
            seen.append(("a SummaryWriter", isinstance(out.writer, SummaryWriter)))
            seen.append(("locked while rendering", vis._write_lock.locked()))
            out.writer.flush()  # passes through, under the lock
            super().log(ctx, out, computed)

    vis = tiny_logger(tmp_path, kinds=[Direct(), "histograms"], async_logging=async_logging)
    written = _records_locked(vis)
    vis.step(0)
    vis.close()
    assert seen == [("log_dir", True), ("a SummaryWriter", True), ("locked while rendering", False)]
    assert written and all(locked for _, locked in written)
    own = [tag for tag, _ in written if tag.startswith("own/") or tag.endswith("direct/x/step")]
    assert own == [f"own/{k}{i}" for i in range(3) for k in "sh"] + ["own/raw", "cnnvis/metrics/direct/x/step"]
    acc = read_events(tmp_path)
    assert [acc.Scalars(f"own/s{i}")[0].value for i in range(3)] == [0.0, 1.0, 2.0]
    assert [acc.Histograms(f"own/h{i}")[0].histogram_value.max for i in range(3)] == [0.0, 1.0, 2.0]
    assert [e.value for e in acc.Scalars("own/raw")] == [7.0]
    assert any(tag.startswith("cnnvis/histograms/") for tag in acc.Tags()["histograms"])


def test_a_write_through_out_writer_after_log_returned_is_written_at_once(tmp_path):
    """A kind that finishes work on a thread of its own (or keeps the writer) still gets its writes to the file."""
    go, threads = threading.Event(), []

    class Later(SlowKind):
        name = "later"

        def log(self, ctx, out, computed):
            writer, step = out.writer, ctx.step

            def finish():
                assert go.wait(10)
                writer.add_scalar("later/value", 5.0, step)

            threads.append(threading.Thread(target=finish))
            threads[-1].start()

    vis = tiny_logger(tmp_path, kinds=[Later()], async_logging=True)
    written = _records_locked(vis)
    vis.log_now(0)
    go.set()
    for thread in threads:
        thread.join(10)
    vis.close()
    assert ("later/value", True) in written
    assert [e.value for e in read_events(tmp_path).Scalars("later/value")] == [5.0]


def test_a_write_racing_with_the_kinds_flush_is_not_lost(tmp_path):
    """A thread of the kind's own writing while the kind's step ends: its call is either kept and written by the
    flush, or made at once after it, never appended to a list the flush has already taken. The thread is held
    between the check and the append until the flush has passed (for at most 1 s)."""
    at_append, passed, threads = threading.Event(), threading.Event(), []

    class HeldAppend(list):
        def append(self, item):
            at_append.set()
            passed.wait(1)
            super().append(item)

    class Racing(SlowKind):
        name = "racing"

        def log(self, ctx, out, computed):
            out._kept.__dict__["_calls"] = HeldAppend()
            real = out._kept._hand_over

            def hand_over():  # in the flush: once the thread is inside its write
                at_append.wait(1)
                taken = real()
                passed.set()
                return taken

            out._kept.__dict__["_hand_over"] = hand_over
            writer, step = out.writer, ctx.step
            threads.append(threading.Thread(target=lambda: writer.add_scalar("racing/value", 5.0, step)))
            threads[-1].start()

    vis = tiny_logger(tmp_path, kinds=[Racing()], async_logging=False)
    vis.log_now(0)
    for thread in threads:
        thread.join(10)
    vis.close()
    assert [e.value for e in read_events(tmp_path).Scalars("racing/value")] == [5.0]


def test_the_users_writer_closed_while_a_kind_renders_is_reopened_not_a_failed_write(tmp_path):
    """PyTorch's SummaryWriter reopens its event file when used after close() (Lightning's finalize closes it in
    mid-training): a kind's writes go to the writer's file writer of the moment they are made."""
    from torch.utils.tensorboard import SummaryWriter

    rendering, closed = threading.Event(), threading.Event()

    class Closing(SlowKind):
        name = "closing"

        def log(self, ctx, out, computed):
            if ctx.step == 0:
                rendering.set()
                assert closed.wait(10)  # the user closes the writer while this kind renders
            out.image("x", "pic", torch.rand(3, 8, 8))
            super().log(ctx, out, computed)

    writer = SummaryWriter(str(tmp_path))
    vis = tiny_logger(None, writer=writer, kinds=[Closing()], async_logging=True)
    vis.step(0)
    assert rendering.wait(10)
    writer.close()
    closed.set()
    vis.step(1)
    vis.close()
    writer.close()
    assert not vis._stopped
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Scalars("cnnvis/metrics/closing/x/step")] == [0, 1]
    assert [e.step for e in acc.Images("cnnvis/closing/x/pic")] == [0, 1]


def test_closing_out_writer_leaves_the_users_writer_open(tmp_path):
    """``with out.writer as w:`` (or ``out.writer.close()``) in a kind flushes: the event file writer is the
    user's too, and closing it under the user's writer would break every later write of theirs."""
    from torch.utils.tensorboard import SummaryWriter

    class Closes(SlowKind):
        name = "closes"
        log_in_background = False

        def log(self, ctx, out, computed):
            with out.writer as w:
                w.add_scalar("own/v", 1.0, ctx.step)
            super().log(ctx, out, computed)

    writer = SummaryWriter(str(tmp_path))
    vis = tiny_logger(None, writer=writer, kinds=[Closes()])
    vis.log_now(0)
    vis.log_now(1)
    vis.close()
    writer.add_scalar("user/after", 1.0, 2)
    writer.close()
    acc = read_events(tmp_path)
    assert {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} == {
        "own/v": [0, 1], "cnnvis/metrics/closes/x/step": [0, 1], "user/after": [2]}


def test_a_picture_added_after_the_kinds_step_is_written(tmp_path):
    later: list = []

    class Keeps(SlowKind):
        name = "keeps"

        def log(self, ctx, out, computed):
            later.append(out)

    vis = tiny_logger(tmp_path, kinds=[Keeps()], async_logging=True)
    vis.log_now(0)
    later[0].image("x", "late", torch.rand(3, 8, 8))
    vis.close()
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/keeps/x/late")] == [0]


def test_a_writer_of_another_kind_gets_copies_of_the_arguments_under_the_lock(tmp_path):
    """A writer that is not PyTorch's (any object with add_* methods) gets the same calls, made at the kind's end
    under the write lock, with the arguments as they were at the call."""
    calls: list[tuple[str, object, bool]] = []

    class Figure:  # a stand-in for a matplotlib figure: the writer reads it at its add_figure call
        title = ""

    class Duck:
        log_dir = str(tmp_path)

        def __getattr__(self, name):
            if name.startswith("add_"):
                return lambda tag, value, *a, **k: calls.append(
                    (tag, value.title if isinstance(value, Figure) else value, vis._write_lock.locked()))
            raise AttributeError(name)

        def flush(self):
            pass

    class Reuse(SlowKind):
        name = "reuse"

        def log(self, ctx, out, computed):
            buffer, listed, figure = torch.zeros(3), [torch.zeros(())], Figure()
            for i in range(2):
                buffer.fill_(float(i))
                listed[0].fill_(float(i))
                figure.title = f"layer {i}"
                out.writer.add_histogram(f"own/h{i}", buffer, ctx.step)
                out.writer.add_histogram(f"own/list{i}", listed, ctx.step)
                out.writer.add_figure(f"own/fig{i}", figure, ctx.step)  # rendered at its call: not kept
            assert isinstance(out.writer, Duck)

    vis = tiny_logger(None, writer=Duck(), kinds=[Reuse(), "kernels"], async_logging=True)
    vis.log_now(0)
    vis.close()
    own = {tag: value if isinstance(value, str) else torch.as_tensor(value).tolist()
           for tag, value, _ in calls if tag.startswith("own/")}
    assert own == {"own/h0": [0.0] * 3, "own/h1": [1.0] * 3, "own/list0": [0.0], "own/list1": [1.0],
                   "own/fig0": "layer 0", "own/fig1": "layer 1"}
    assert any(tag.startswith("cnnvis/kernels/") for tag, _, _ in calls)
    assert all(locked for _, _, locked in calls)


def test_the_steps_probe_pass_is_freed_before_the_worker_is_handed_the_step(tmp_path):
    """Freeing the probe pass (its tensors and autograd graph) can let go of the GIL; once the worker is awake it
    then keeps the GIL for the switch interval (5 ms) while the training thread waits, which doubled the blocking
    time of a demo logging step in about half the steps. So it is freed first."""
    import weakref

    class Watch(SlowKind):
        name = "watch"

        def needs(self):
            return Needs(graph_activations=("stem.0",))

        def compute(self, ctx):
            passes.append(weakref.ref(ctx.shared))
            return super().compute(ctx)

    passes: list[weakref.ref] = []
    alive_at_submit: list[bool] = []
    vis = tiny_logger(tmp_path, kinds=[Watch(), "features"], async_logging=True)
    submit = vis._worker.submit

    def watched(job):
        alive_at_submit.append(passes[-1]() is not None)
        submit(job)

    vis._worker.submit = watched
    for step in range(3):
        vis.step(step)
    vis.close()
    assert alive_at_submit == [False, False, False]


def test_log_now_waits_for_its_own_step(tmp_path):
    slow = SlowKind(seconds=0.2)
    vis = tiny_logger(tmp_path, kinds=[slow], async_logging=True)
    vis.log_now(0)
    assert slow.logged == [0] and vis._worker.pending == 0
    vis.close()


def _live_tensors() -> int:
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lazy torch modules warn when looked at
                count += isinstance(obj, torch.Tensor)
        except Exception:  # objects that refuse isinstance
            pass
    return count


def test_memory_flat_over_many_logging_steps(tmp_path, one_thread):
    vis = tiny_logger(tmp_path, kinds=["features", "gradcam", "health"], every=1, cam_metrics=False,
                      async_logging=True)
    counts = {}
    for step in range(200):
        vis.step(step)
        if step in (40, 199):
            vis.wait()
            counts[step] = _live_tensors()
    vis.close()
    assert counts[199] <= counts[40] + 2, counts
    assert len(read_events(tmp_path).Images("cnnvis/features/stem.0/probe_000")) == 200


def test_strict_failure_on_the_worker_raises_at_the_next_step(tmp_path):
    failing = SlowKind(fail=ValueError)
    vis = tiny_logger(tmp_path, kinds=["features", failing], async_logging=True, strict=True)
    assert vis.step(0)  # the failure happens on the worker, after step() returned
    with pytest.raises(ValueError, match="on purpose"):
        vis.step(1)  # waits for step 0's work, then raises its failure
    vis.close()  # raised once: close does not raise it again


def test_strict_failure_raises_at_close(tmp_path):
    failing = SlowKind(seconds=0.1, fail=ValueError)
    vis = tiny_logger(tmp_path, kinds=[failing], async_logging=True, strict=True)
    vis.step(0)
    with pytest.raises(ValueError, match="on purpose"):
        vis.close()
    assert vis._closed and vis._worker._thread is not None and not vis._worker._thread.is_alive()


class FailingCompute(SlowKind):
    name = "failing_compute"

    def compute(self, ctx):
        raise MemoryError("compute failed on purpose")


def test_strict_failure_in_compute_raises_at_its_step_and_the_kinds_before_it_log(tmp_path):
    slow = SlowKind()
    vis = tiny_logger(tmp_path, kinds=[slow, FailingCompute()], async_logging=True, strict=True)
    with pytest.raises(MemoryError, match="on purpose"):
        vis.step(0)  # compute runs on the training thread: raised at once
    vis.close()
    assert slow.logged == [0]


def test_strict_failure_raises_at_log_now(tmp_path):
    vis = tiny_logger(tmp_path, kinds=[SlowKind(fail=ValueError)], async_logging=True, strict=True)
    with pytest.raises(ValueError, match="on purpose"):
        vis.log_now(0)
    vis.close()


def test_non_strict_failure_warns_once_and_the_others_log(tmp_path):
    failing = SlowKind(fail=ValueError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis = tiny_logger(tmp_path, kinds=["features", failing], every=1, async_logging=True, strict=False)
        for step in range(3):
            vis.step(step)
        vis.close()  # never raises
    ours = [w for w in caught if "the slow visual failed" in str(w.message)]
    assert len(ours) == 1
    assert len(read_events(tmp_path).Images("cnnvis/features/stem.0/probe_000")) == 3


def test_write_failure_on_the_worker_stops_writing_and_close_does_not_raise(tmp_path):
    failing = SlowKind(fail=OSError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis = tiny_logger(tmp_path, kinds=[failing], async_logging=True, strict=False)
        vis.step(0)
        vis.wait()
        assert vis.step(1) is False  # stopped: nothing more is logged, training goes on
        vis.close()
    assert sum("stops writing" in str(w.message) for w in caught) == 1


def test_actmax_background_with_async_logging(tmp_path):
    with tiny_logger(tmp_path, kinds=["actmax", "features"], every=1, actmax_background=True,
                     async_logging=True) as vis:
        for step in range(1, 4):
            vis.step(step)
    acc = read_events(tmp_path)
    assert acc.Images(next(t for t in acc.Tags()["images"] if t.startswith("cnnvis/actmax/")))
    assert len(acc.Images("cnnvis/features/stem.0/probe_000")) == 3


def test_options_are_checked(tmp_path):
    with pytest.raises(TypeError, match="async_logging must be True"):
        tiny_logger(tmp_path, async_logging="yes")
    with pytest.raises(ValueError, match="max_pending must be a positive int"):
        tiny_logger(tmp_path, async_logging=True, max_pending=0)


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
from _models import TinyCNN, make_batch
from cnnvis_tb import VisLogger
from cnnvis_tb.kinds import Kind

class Slow(Kind):
    name, every, layer_role, log_in_background = "slow", 1, None, True
    def log(self, ctx, out, computed):
        time.sleep({sleep})
        out.scalar("x", "step", ctx.step)

torch.manual_seed(0)
probe, labels = make_batch(2, n=4)
vis = VisLogger(TinyCNN(), {log_dir!r}, probe=probe, probe_labels=labels, every=1, strict=True,
                kinds=["features", Slow()], async_logging=True, max_pending={max_pending})
for step in range({steps}):
    vis.step(step)
    print(step, flush=True)
{end}
"""


def _child(log_dir, *, steps, sleep, max_pending=1, end="") -> str:
    return textwrap.dedent(_CHILD).format(tests=str(TESTS), log_dir=str(log_dir), steps=steps, sleep=sleep,
                                          max_pending=max_pending, end=end)


@pytest.mark.parametrize("max_pending", [1, 2])
def test_sigkill_loses_at_most_the_steps_in_flight(tmp_path, max_pending):
    n = 4
    child = subprocess.Popen([sys.executable, "-c", _child(tmp_path, steps=100, sleep=0.3,
                                                           max_pending=max_pending)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        returned = 0
        while returned < n:
            line = child.stdout.readline()
            assert line, "the child ended early"
            returned += 1
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    acc = read_events(tmp_path)
    slow = [e.step for e in acc.Scalars("cnnvis/metrics/slow/x/step")] if "cnnvis/metrics/slow/x/step" in acc.Tags()[
        "scalars"] else []
    images = [e.step for e in acc.Images("cnnvis/features/stem.0/probe_000")]
    # Every step whose work the worker finished is on disk: at least the returned ones but max_pending.
    assert len(slow) >= n - max_pending and len(images) >= n - max_pending, (slow, images)
    assert slow == sorted(slow) and slow == list(range(len(slow)))


def test_interpreter_exit_waits_for_the_queue(tmp_path):
    done = subprocess.run([sys.executable, "-c", _child(tmp_path, steps=2, sleep=0.5)], capture_output=True,
                          text=True, timeout=120)  # no close(): the exit hooks write the queued steps
    assert done.returncode == 0, done.stderr
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Scalars("cnnvis/metrics/slow/x/step")] == [0, 1]
    assert [e.step for e in acc.Images("cnnvis/features/stem.0/probe_000")] == [0, 1]


def _train_on_a_thread_that_outlives_main(log_dir, options: str, steps: range, sleep: float) -> None:
    """A script whose training thread (not a daemon) logs ``steps`` after its main thread ended, then closes."""
    code = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(TESTS)!r})
        from _models import tiny_logger
        vis = tiny_logger({str(log_dir)!r}, {options})
        def train():
            for step in {list(steps)!r}:
                time.sleep({sleep})
                vis.step(step)
            vis.close()
        threading.Thread(target=train).start()  # not a daemon; the main thread ends here
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr


@pytest.mark.parametrize("async_logging", [False, True])
def test_training_on_a_thread_that_outlives_the_main_thread_still_writes_pictures(tmp_path, async_logging):
    """Python stops the ``concurrent.futures`` pools (our PNG encoders) before it joins non-daemon threads: a run
    whose training thread goes on after the main thread ended lost every picture from then on."""
    _train_on_a_thread_that_outlives_main(
        tmp_path, f'kinds=["kernels", "features"], every=1, async_logging={async_logging}', range(4), 0.3)
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/features/stem.0/probe_000")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [0, 1, 2, 3]


def test_frozen_copies_are_refreshed_in_place_and_remade_when_the_model_changes():
    """The copy the CAM metrics run on the worker: refreshed from the model's parameters and buffers when handed
    back (no new deep copy), frozen, sharing no memory with the model; a new deep copy once the model's parameters
    change in name or shape."""
    from cnnvis_tb.safety import FrozenCopies

    model = TinyCNN().train()
    copies = FrozenCopies()
    first = copies.take(model)
    assert not first.training and all(not p.requires_grad and p.grad is None for p in first.parameters())
    assert {p.data_ptr() for p in first.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())
    assert copies.take(model) is not first  # still in use: another copy
    copies.give_back(first)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    model(torch.rand(2, 3, 16, 16))  # training mode: BatchNorm's running statistics move
    again = copies.take(model)
    assert again is first  # refreshed, not copied anew
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    copies.give_back(again)
    model.head = torch.nn.Linear(16, 7)  # another shape
    assert copies.take(model) is not first


def test_a_failing_gradcam_step_gives_its_frozen_copy_back(tmp_path):
    """A Grad-CAM step that failed after taking the frozen copy for its metrics kept that copy for ever (one more
    copy of the model every logging step, and a new deep copy at each)."""
    model = TinyCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vis = tiny_logger(tmp_path, model, kinds=["gradcam"], every=1, async_logging=True, strict=False,
                          layers={"gradcam": ["body.4"]})
        copies = vis.kind("gradcam")._copies
        vis.step(0)
        vis.wait()
        assert len(copies._free) == 1 and not copies._state
        del model.body._modules["4"]  # the CAM layer is gone: compute fails after taking the copy
        for step in range(1, 6):
            vis.step(step)
        vis.wait()
        gc.collect()
        assert len(copies._free) == 1 and not copies._state  # the one copy, free again each time
        vis.close()


class NoisyCNN(TinyCNN):
    """Draws from the global RNG also in eval mode (a noise layer, as Monte-Carlo dropout would)."""

    def forward(self, x):
        return super().forward(x + 0.01 * torch.randn_like(x))


def _background_kinds():
    return ["gradcam", "features", DeepDream(octaves=1, steps=2, background=True), "actmax"]


def test_a_model_with_hooks_of_its_own_runs_only_on_the_training_thread(tmp_path):
    """A frozen copy carries the user's hooks along: on the worker they fired at moments the training loop cannot
    foresee, writing the metrics' perturbed batches into the user's objects. Such a model's work stays on the
    training thread (inside vis.step), as with async_logging=False."""
    model = TinyCNN()
    calls: list[str] = []
    model.body[2].register_forward_hook(lambda m, i, o: calls.append(threading.current_thread().name))
    vis = tiny_logger(tmp_path, model, kinds=_background_kinds(), every=1, async_logging=True,
                      actmax_background=True, actmax_channels=2)
    for step in range(2):
        vis.step(step)
        vis.wait()
    vis.close()
    assert calls and set(calls) == {"MainThread"}
    assert vis._info.background_hazard(vis._net) == "has hooks of its own (forward hooks on 'body.2')"
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/actmax/body.3/channels")] == [1]  # (not at step 0)
    assert any("deletion" in tag for tag in acc.Tags()["scalars"])  # the metrics still ran, on the training thread


def test_a_model_drawing_random_numbers_in_eval_mode_never_runs_elsewhere(tmp_path):
    """On another thread its forwards moved the global RNG training draws from (training was no longer
    bit-identical); the probe pass shows it, and its work then stays on the training thread."""
    torch.manual_seed(0)
    vis = tiny_logger(tmp_path, NoisyCNN(), kinds=_background_kinds(), every=1, async_logging=True,
                      actmax_background=True, actmax_channels=2)
    for step in range(2):
        state = torch.get_rng_state()
        vis.step(step)
        vis.wait()
        assert torch.equal(state, torch.get_rng_state())
    vis.close()
    assert vis._info.draws_random


def test_weight_norm_hooks_keep_the_work_in_the_background():
    from torch.nn.utils import spectral_norm, weight_norm

    from cnnvis_tb.safety import foreign_hooks

    model = TinyCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated in favour of parametrizations
        weight_norm(model.stem[0])
    spectral_norm(model.head)
    assert foreign_hooks(model) is None
    handle = model.head.register_forward_pre_hook(lambda m, a: None)
    assert foreign_hooks(model) == "forward pre hooks on 'head'"
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert foreign_hooks(model) == "global module hooks (forward hooks)"
    finally:
        handle.remove()


def test_strict_failure_of_background_actmax_raises_on_the_training_thread(tmp_path, monkeypatch):
    """It was kept in the worker's future and never raised (nor warned) anywhere."""
    import cnnvis_tb.kinds.actmax as actmax

    def fails(*args, **kwargs):
        raise RuntimeError("optimization failed on the snapshot")

    monkeypatch.setattr(actmax, "optimize_channels", fails)
    vis = tiny_logger(tmp_path / "wait", kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2)
    vis.step(1)
    with pytest.raises(RuntimeError, match="failed on the snapshot"):
        vis.wait()
    vis.close()
    vis = tiny_logger(tmp_path / "next", kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2)
    vis.step(1)
    vis.kind("actmax")._worker._pending[0].exception()  # the work failed on the worker
    with pytest.raises(RuntimeError, match="failed on the snapshot"):
        vis.step(2)
    vis.close()
    vis = tiny_logger(tmp_path / "close", kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2)
    vis.step(1)
    with pytest.raises(RuntimeError, match="failed on the snapshot"):
        vis.close()


def test_interpreter_exit_waits_for_background_actmax(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from _models import tiny_logger
        vis = tiny_logger({str(tmp_path)!r}, kinds=["actmax"], every=1, actmax_background=True,
                          actmax_channels=2, actmax_steps=30)
        vis.step(1)  # no close(): the script ends while the optimization runs
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/actmax/body.3/channels")] == [1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.parametrize("async_logging", [False, True])
def test_a_forked_child_logs_to_an_event_file_of_its_own(tmp_path, async_logging):
    """The parent's writer waits for a writer thread the child does not have: the child's first logging step hung
    in its flush (and a lock a parent's thread held at the fork stayed locked)."""
    vis = tiny_logger(tmp_path, kinds=["kernels"], every=1, async_logging=async_logging)
    vis.step(0)
    vis.wait()
    pid = os.fork()
    if pid == 0:  # the child: exits with 0 only if it logged and closed
        code = 1
        try:
            signal.alarm(30)
            vis.step(1)
            vis.close()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in its logging step")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    vis.step(2)
    vis.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2  # the parent's and the child's
    assert sorted(e.step for e in read_events(tmp_path).Images("cnnvis/kernels/stem.0/grid")) == [0, 1, 2]


def test_a_forked_child_with_the_users_writer_says_it_cannot_log(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    vis = tiny_logger(None, writer=writer, kinds=["kernels"], every=1)
    vis.step(0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logged = vis.step(1)
                vis.close()
            code = 0 if not logged and any("cannot write from this process" in str(w.message) for w in caught) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    vis.close()
    writer.close()


def test_frozen_copies_go_by_identity_and_do_not_keep_themselves_alive():
    """Taken copies were keyed by the module: two copies of a model that defines ``__eq__`` / ``__hash__`` shared one
    entry (one never came back, the next take handed out a copy with stale weights)."""
    import weakref

    from cnnvis_tb.safety import FrozenCopies

    class Equal(TinyCNN):
        def __eq__(self, other):
            return isinstance(other, Equal)

        def __hash__(self):
            return 1

    model, copies = Equal(), FrozenCopies()
    first, second = copies.take(model), copies.take(model)
    copies.give_back(first)
    copies.give_back(second)
    assert len(copies._free) == 2 and not copies._state
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again = copies.take(model)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters(), strict=True))
    gone = weakref.ref(copies)
    del copies, first, second, again
    gc.collect()
    assert gone() is None


@pytest.mark.skipif(not hasattr(os, "fork") or not torch.distributed.is_available(), reason="needs os.fork and gloo")
def test_ranks_forked_after_the_logger_was_made_log_on_rank_0_only(tmp_path):
    """DDP with the fork start method: the logger is made before the ranks exist; each forked rank learns its rank
    when its process group is up (rank 1 wrote a file of its own, every picture twice)."""
    import torch.distributed as dist

    vis = tiny_logger(tmp_path / "logs", kinds=["kernels"], every=1)
    vis.step(0)
    vis.wait()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(60)
                dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2)
                logged = vis.log_now(1)
                vis.close()
                dist.barrier()
                dist.destroy_process_group()
                code = 0 if logged == (rank == 0) else 3
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    vis.close()
    assert codes == [0, 0]
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 2  # the parent's and rank 0's
    assert sorted(e.step for e in read_events(tmp_path / "logs").Images("cnnvis/kernels/stem.0/grid")) == [0, 1]


def test_a_lazy_module_drawing_its_first_weights_is_not_taken_for_a_random_model(tmp_path):
    class Lazy(TinyCNN):
        def __init__(self):
            super().__init__()
            self.head = nn.LazyLinear(4)

    vis = tiny_logger(tmp_path, Lazy(), kinds=["gradcam"], every=1, async_logging=True)
    vis.step(0)
    vis.close()
    assert not vis._info.draws_random and vis._info.background_hazard(vis._net) is None


def test_pruning_hooks_keep_the_work_in_the_background():
    from torch.nn.utils import prune

    from cnnvis_tb.safety import foreign_hooks

    model = TinyCNN()
    prune.l1_unstructured(model.stem[0], "weight", amount=0.3)
    assert foreign_hooks(model) is None


def test_background_actmax_on_a_thread_that_outlives_the_main_thread_still_writes(tmp_path):
    _train_on_a_thread_that_outlives_main(
        tmp_path, 'kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2', range(1, 3), 0.5)
    assert [e.step for e in read_events(tmp_path).Images("cnnvis/actmax/body.3/channels")] == [1, 2]


def test_a_strict_failure_at_close_does_not_hide_the_with_blocks_own_exception(tmp_path, monkeypatch):
    import cnnvis_tb.kinds.actmax as actmax

    def fails(*args, **kwargs):
        raise RuntimeError("optimization failed on the snapshot")

    monkeypatch.setattr(actmax, "optimize_channels", fails)
    with pytest.raises(KeyError, match="the user's own"):
        with tiny_logger(tmp_path, kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2) as vis:
            vis.step(1)
            raise KeyError("the user's own")


def test_a_strict_background_failure_seen_at_the_end_of_the_main_thread_is_still_raised(tmp_path):
    """The drain at the end of the main thread waited for background actmax and swallowed its strict failure."""
    code = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(TESTS)!r})
        import cnnvis_tb.kinds.actmax as actmax
        from _models import tiny_logger
        def fails(*args, **kwargs):
            time.sleep(0.5)
            raise RuntimeError("optimization failed on the snapshot")
        actmax.optimize_channels = fails
        vis = tiny_logger({str(tmp_path)!r}, kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2)
        vis.step(1)
        def train():
            time.sleep(1.5)  # the main thread has ended and its exit hooks ran
            try:
                vis.close()
                print("not raised")
            except RuntimeError as e:
                print("raised:", e)
        threading.Thread(target=train).start()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "raised: optimization failed on the snapshot" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_frozen_copies_get_a_new_lock_in_a_forked_child():
    from cnnvis_tb.safety import FrozenCopies

    copies, model = FrozenCopies(), TinyCNN()
    held, release = threading.Event(), threading.Event()

    def hold():
        with copies._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)
            copies.give_back(copies.take(model))
            code = 0
        finally:
            os._exit(code)
    release.set()
    holder.join()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_work_that_moves_to_the_training_thread_waits_for_the_background_step_before_it(tmp_path, monkeypatch):
    """A model that got hooks of its own while background actmax was still running an earlier step: the step now
    run on the training thread wrote its pictures before the earlier step's."""
    import cnnvis_tb.kinds.actmax as actmax

    optimize, gate = actmax.optimize_channels, threading.Event()

    def slow_first(*args, **kwargs):
        if not gate.is_set():
            gate.set()
            time.sleep(1.0)
        return optimize(*args, **kwargs)

    monkeypatch.setattr(actmax, "optimize_channels", slow_first)
    model = TinyCNN()
    vis = tiny_logger(tmp_path, model, kinds=["actmax"], every=1, actmax_background=True, actmax_channels=2)
    kind = vis.kind("actmax")
    written, write = [], kind._write
    kind._write = lambda out, computed: (written.append(out.step), write(out, computed))
    vis.step(1)  # in the background, slow
    assert gate.wait(10)
    model.body[2].register_forward_hook(lambda m, i, o: None)  # from now on: on the training thread
    vis.step(2)
    vis.close()
    assert written == [1, 2]
