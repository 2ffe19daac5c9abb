"""Fully sharded training on 2 CPU processes (gloo): FSDP2 ``fully_shard``, FSDP1 ``FullyShardedDataParallel`` (flat
parameters and ``use_orig_params=True``) and Lightning's ``ModelParallelStrategy`` with ``CnnVisCallback``.

``VisLogger`` is built and stepped on every rank, as users write it. Each rank joins one gather of the full
parameters per logging step and rank 0 logs on an unsharded copy (``cnnvis_tb/distributed.py``). What is checked:

* training is bit-identical with and without the logger on every rank (local parameter shards, gradients,
  optimizer state, BatchNorm buffers, RNG state; hooks and training flags as without the logger), with
  ``vis.step`` between ``backward()`` and ``optimizer.step()`` and inside ``torch.inference_mode()``, and (FSDP1
  with ``use_orig_params``) activation maximization in the background;
* exactly one events file, written by rank 0, holding every kind at every scheduled step;
* the pictures (and histograms and scalars) equal those a plain single-process ``VisLogger`` writes for the same
  model unsharded: the full states at the logging steps, taken through ``torch.distributed.checkpoint``'s full
  state dict (an independent path), are logged again in this pytest process and compared pixel by pixel;
* a failure on rank 0 never leaves a rank waiting: under ``strict=True`` every rank raises; without it rank 0 warns
  once and every rank trains on; a bad layer name stops every rank in the constructor; a failed write stops the
  gathers of every rank;
* the negative control: rank 0 running the sharded model alone (what the logger did before) kills the run.

The processes run this file as a script (``python test_fsdp.py --worker ...``), so a hang fails a test after a
timeout instead of blocking the suite. One process pair runs every FSDP scenario in turn (one start-up); the
Lightning pair and the negative control run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import RunFailed, finish_ranks

STEPS = 20
EVERY = 5  # every kind is due at steps 0, 5, 10, 15 (actmax at 5, 10, 15)
WORLD = 2
TIMEOUT = 150  # seconds for a whole 2-process run
FLAVOURS = ("fsdp2", "fsdp1", "fsdp1-orig")
KINDS = ("kernels", "features", "gradcam", "saliency", "actmax", "histograms", "health")
IMAGE_KINDS = {"kernels", "features", "gradcam", "saliency", "actmax"}
LIGHTNING_STEPS = 6
CI = os.environ.get("CI", "").lower() == "true"


def _missing() -> str | None:
    """Why the FSDP tests cannot run here (None: they can)."""
    if not torch.distributed.is_available():
        return "torch is built without torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "torch is built without the gloo backend"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.fsdp is missing ({e})"
    return None


def _require(reason: str | None) -> None:
    """Skip with the reason locally; under CI=true a missing piece is a failure, not a skip."""
    if reason is not None:
        (pytest.fail if CI else pytest.skip)(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, mode: str, *, pg_timeout: float = 60) -> list[subprocess.Popen]:
    """Start the WORLD processes of one distributed run (Lightning's environment variables included)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--rank",
                str(rank),
                "--out",
                str(out),
                "--mode",
                mode,
                "--pg-timeout",
                str(pg_timeout),
            ],
            env=dict(env, LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]


def _finish(procs: list[subprocess.Popen], out: Path, *, timeout: float = TIMEOUT) -> list[dict]:
    """Wait for a run; returns each rank's report (see ``_models.finish_ranks``)."""
    return finish_ranks(procs, out, timeout=timeout)


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # when its test was not run
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Every process pair starts at once: the FSDP scenarios, Lightning, and the negative control (which mostly
    waits for gloo to notice the mismatch)."""
    _require(_missing())
    pairs = {}
    for mode, pg_timeout in (("careless", 10), ("main", 60), ("lightning", 60)):
        out = tmp_path_factory.mktemp(mode)
        pairs[mode] = (_start(out, mode, pg_timeout=pg_timeout), out)
    yield pairs
    for procs, _ in pairs.values():
        _kill(procs)


@pytest.fixture(scope="module")
def main_run(started):
    procs, out = started["main"]
    return out, _finish(procs, out)


def _events_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_is_bit_identical_with_the_logger_on_every_rank(main_run, flavour):
    out, reports = main_run
    for rank in range(WORLD):
        plain, logged = (torch.load(out / f"{flavour}-{phase}-rank{rank}.pt") for phase in ("plain", "logger"))
        assert plain.keys() == logged.keys()
        assert any(k.startswith("opt:") for k in plain) and any(k.startswith("grad:") for k in plain)
        for name in plain:
            assert torch.equal(plain[name], logged[name]), f"rank {rank}: {name} differs"
        # The comparison can fail: training moved this rank's shards and BatchNorm statistics.
        initial = torch.load(out / f"{flavour}-initial-rank{rank}.pt")
        moved = [
            k
            for k in initial
            if k.startswith(("param:", "buffer:")) and initial[k].numel() and not torch.equal(initial[k], plain[k])
        ]
        assert any(k.startswith("param:") for k in moved) and any("running_mean" in k for k in moved), moved
        report = reports[rank][flavour]
        assert report["hooks_as_without_logger"], f"rank {rank}: hooks differ from the run without the logger"
        assert report["all_training"], f"rank {rank}: a module was left in eval mode"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_only_rank_zero_writes_one_event_stream_with_every_kind(main_run, flavour):
    from _models import read_events

    out, reports = main_run
    runs = out / f"{flavour}-runs"
    files = _events_files(runs)
    assert len(files) == 1, f"expected one events file, found {[str(f.relative_to(out)) for f in files]}"
    logged_steps = [s for s in range(STEPS) if s % EVERY == 0]
    assert reports[0][flavour]["logged"] == [s in logged_steps for s in range(STEPS)]
    assert reports[1][flavour]["logged"] == [False] * STEPS  # rank 1 gathers, never writes
    # Every rank sees the layers rank 0 chose, named as in the unsharded model.
    assert reports[0][flavour]["layers"] == reports[1][flavour]["layers"]
    assert reports[0][flavour]["layers"]["gradcam"] == ["body"]

    acc = read_events(runs)
    tags = acc.Tags()
    assert {t.split("/")[1] for t in tags["images"]} == IMAGE_KINDS
    assert "cnnvis/gradcam/body/probe_000" in tags["images"]
    for tag in tags["images"]:
        first = EVERY if tag.startswith("cnnvis/actmax/") else 0  # the schedule starts actmax at its interval
        assert [e.step for e in acc.Images(tag)] == list(range(first, STEPS, EVERY)), tag
    assert "cnnvis/histograms/stem.0/weight" in tags["histograms"]
    health = [t for t in tags["scalars"] if t.startswith("cnnvis/metrics/health/")]
    assert health and all(len(acc.Scalars(t)) >= 3 for t in health)
    assert any(t.startswith("cnnvis/metrics/gradcam/") for t in tags["scalars"])
    assert tags["tensors"], "the layer table (text) is missing"
    # Gradients exist per parameter in FSDP2 and with use_orig_params; FSDP1's flat parameters have none to show.
    grads = [t for t in tags["histograms"] if t.endswith(".grad")]
    assert bool(grads) == (flavour != "fsdp1"), grads


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pictures_equal_those_of_the_same_model_unsharded(main_run, flavour, tmp_path):
    """The full states at the logging steps (params, rank 0's buffers, gradients when FSDP has them per parameter),
    logged by a plain VisLogger in this process, give the same pixels, histograms and scalars."""
    from _models import TinyCNN, decode_png, read_events

    from cnnvis_tb import VisLogger

    out, _ = main_run
    snapshots = torch.load(out / f"{flavour}-reference.pt")
    assert sorted(snapshots) == list(range(0, STEPS, EVERY))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float reductions
    try:
        torch.manual_seed(0)
        model = TinyCNN()
        vis = VisLogger(model, tmp_path / "plain", **_vis_options())
        for step in sorted(snapshots):
            model.load_state_dict(snapshots[step]["state"])
            for name, p in model.named_parameters():
                p.grad = snapshots[step]["grads"].get(name)
            assert vis.step(step)
        vis.close()
    finally:
        torch.set_num_threads(threads)

    sharded, plain = read_events(out / f"{flavour}-runs"), read_events(tmp_path / "plain")
    for kind in ("images", "histograms", "scalars"):
        assert sorted(sharded.Tags()[kind]) == sorted(plain.Tags()[kind]), kind
    compared = 0
    for tag in plain.Tags()["images"]:
        a, b = sharded.Images(tag), plain.Images(tag)
        assert [e.step for e in a] == [e.step for e in b], tag
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(decode_png(x.encoded_image_string), decode_png(y.encoded_image_string)), (
                f"{tag} at step {x.step}"
            )
            compared += 1
    assert compared >= 40
    for tag in plain.Tags()["histograms"]:
        a, b = sharded.Histograms(tag), plain.Histograms(tag)
        assert [(e.step, e.histogram_value) for e in a] == [(e.step, e.histogram_value) for e in b], tag
    for tag in plain.Tags()["scalars"]:
        assert [(e.step, e.value) for e in sharded.Scalars(tag)] == [(e.step, e.value) for e in plain.Scalars(tag)], tag


@pytest.mark.parametrize("flavour", ("fsdp2", "fsdp1"))
def test_a_strict_failure_on_rank_zero_raises_on_every_rank(main_run, flavour):
    _, reports = main_run
    zero, one = (reports[r][flavour]["strict_failure"] for r in range(WORLD))
    assert zero == ["ValueError", "boom on rank 0"]
    assert one[0] == "RuntimeError"
    assert "logging step 0 failed on rank 0 (ValueError: boom on rank 0); every rank stops" in one[1]
    assert reports[0][flavour]["barrier_after_failure"] and reports[1][flavour]["barrier_after_failure"]


def test_a_failing_visual_warns_once_on_rank_zero_and_every_rank_trains_on(main_run):
    _, reports = main_run
    zero, one = (reports[r]["fsdp2"]["warn_failure"] for r in range(WORLD))
    assert zero["steps_done"] == one["steps_done"] == 4
    assert len(zero["warnings"]) == 1 and "the exploding visual failed at step 0" in zero["warnings"][0]
    assert one["warnings"] == []
    assert zero["logged"] == [True] * 4 and one["logged"] == [False] * 4  # the other kind still logs


def test_a_bad_layer_name_stops_every_rank_in_the_constructor(main_run):
    _, reports = main_run
    zero, one = (reports[r]["fsdp2"]["bad_layer"] for r in range(WORLD))
    assert zero[0] == "ValueError" and "unknown layer 'bodyy'" in zero[1] and "did you mean 'body'" in zero[1]
    assert one[0] == "RuntimeError"
    assert "VisLogger(...) failed on rank 0 (ValueError: unknown layer 'bodyy'" in one[1]


def test_a_failed_write_on_rank_zero_stops_the_gathers_of_every_rank(main_run):
    _, reports = main_run
    zero, one = (reports[r]["fsdp2"]["write_failure"] for r in range(WORLD))
    assert len(zero["warnings"]) == 1 and "failed" in zero["warnings"][0] and "disk full" in zero["warnings"][0]
    assert zero["logged"] == one["logged"] == [False, False, False]
    assert zero["stopped"] and one["stopped"]
    assert one["gathers"] == 1  # the failed step's; none after it


def test_rank_zero_running_the_sharded_model_alone_kills_the_run(started):
    """The harness catches what the logger did before FSDP support: rank 0 alone running the sharded forward
    (all-gathers rank 1 never joins) aborts or hangs the run."""
    procs, out = started["careless"]
    with pytest.raises(RunFailed, match="run failed|did not finish"):
        _finish(procs, out, timeout=90)


def _lightning_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("lightning") else "the Lightning tests need `pip install lightning`"


@pytest.fixture(scope="module")
def lightning_run(started):
    _require(_lightning_missing())
    procs, out = started["lightning"]
    return out, _finish(procs, out)


def test_lightning_refuses_its_fsdp_strategy_on_cpu(lightning_run):
    """Lightning's FSDPStrategy (FSDP1) needs CUDA (checked in the Lightning worker, which imports Lightning
    anyway); the FSDP2 route (ModelParallelStrategy, next test) runs on CPU."""
    _, reports = lightning_run
    refusals = reports[0]["fsdp_strategy_on_cpu"]
    assert [r[0] for r in refusals] == ["ValueError", "ValueError"]  # strategy="fsdp" and FSDPStrategy()
    for _, message in refusals:
        assert message == (
            "The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. "
            "Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` "
            "instance to use FSDP."
        )


def test_lightning_model_parallel_fsdp2_with_the_callback(lightning_run):
    from _models import read_events

    out, reports = lightning_run
    files = _events_files(out)
    assert len(files) == 1 and files[0].parent == out / "vis", files
    acc = read_events(out / "vis")
    assert {t.split("/")[1] for t in acc.Tags()["images"]} == {"kernels", "gradcam"}
    steps = list(range(0, LIGHTNING_STEPS + 1, 2))
    assert [e.step for e in acc.Images("cnnvis/kernels/net.stem.0/grid")] == steps  # names inside the module
    assert [e.step for e in acc.Images("cnnvis/gradcam/net.body/probe_000")] == steps
    # Gradients after each batch (gathered from their shards), none before the first one.
    assert [e.step for e in acc.Histograms("cnnvis/histograms/net.stem.0/weight.grad")] == steps[1:]
    assert [r["vis_on_rank"] for r in reports] == [True, True]  # every rank runs a VisLogger (and gathers)
    for rank in range(WORLD):
        plain, logged = (torch.load(out / f"lightning-{phase}-rank{rank}.pt") for phase in ("plain", "logger"))
        assert plain.keys() == logged.keys()
        for name in plain:
            assert torch.equal(plain[name], logged[name]), f"rank {rank}: {name} differs"
        assert reports[rank]["trained"], "the stem's weights did not move: the comparison proves nothing"


# ---------------------------------------------------------------------- the worker (runs in each process)
def _vis_options(**overrides) -> dict:
    from _models import make_batch

    probe, labels = make_batch(99, n=2)
    options = dict(
        probe=probe,
        probe_labels=labels,
        every=EVERY,
        kinds=KINDS,
        strict=True,
        actmax_steps=2,
        actmax_channels=1,
        top_k=2,
    )
    return {**options, **overrides}


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _local_state(model, opt) -> dict[str, torch.Tensor]:
    """Everything training leaves on this rank: its shards, their gradients, the optimizer state, the buffers and
    the RNG state."""
    state = {}
    for name, p in model.named_parameters():
        state[f"param:{name}"] = _local(p)
        if p.grad is not None:
            state[f"grad:{name}"] = _local(p.grad)
    for name, b in model.named_buffers():
        state[f"buffer:{name}"] = b.detach().clone()
    if opt is not None:
        for index, entry in opt.state_dict()["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    state[f"opt:{index}:{key}"] = _local(value)
    state["rng"] = torch.get_rng_state()
    return state


def _sharded_model(flavour: str):
    from _models import TinyCNN
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = TinyCNN()
    if flavour == "fsdp2":
        for unit in (model.stem, model.body, model):
            fully_shard(unit)
        return model
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}),
        use_orig_params=flavour == "fsdp1-orig",
        device_id=torch.device("cpu"),
    )


def _full_snapshot(model, flavour: str) -> dict:
    """The full model as a plain state dict (torch.distributed.checkpoint, not cnnvis_tb) and its full gradients;
    a collective. Rank 0's buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    grads = {}
    if flavour == "fsdp2":
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    elif flavour == "fsdp1-orig":
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, with_grads=True):
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"state": {k: v.detach().clone() for k, v in state.items()}, "grads": grads}


def _train(rank: int, out: Path, flavour: str, phase: str) -> dict:
    """STEPS steps from a fixed seed, each rank on its own data; ``vis.step`` sits between ``backward()`` and
    ``optimizer.step()``, where the gradients must stay intact. The logged run also takes the full state at each
    logging step through ``torch.distributed.checkpoint``, the reference for the pictures: it is compared with
    the run without either, so neither may change training."""
    import torch.nn.functional as F
    from _models import hook_counts, make_batch

    from cnnvis_tb import VisLogger

    model = _sharded_model(flavour)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if phase == "plain":
        torch.save(_local_state(model, None), out / f"{flavour}-initial-rank{rank}.pt")
    vis = None
    if phase == "logger":  # one flavour runs activation maximization on a snapshot in a worker thread
        vis = VisLogger(model, out / f"{flavour}-runs", **_vis_options(actmax_background=flavour == "fsdp1-orig"))
    report: dict = {"logged": []}
    snapshots = {}
    torch.manual_seed(1234)  # the dropout masks
    for step in range(STEPS):
        x, y = make_batch(1000 * rank + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if vis is not None:
            with torch.inference_mode():  # as a loop inside an evaluation context would call it
                report["logged"].append(vis.step(step))
        if vis is not None and step % EVERY == 0:  # the reference for the pictures: a collective
            snapshot = _full_snapshot(model, flavour)
            if rank == 0:
                snapshots[step] = snapshot
        opt.step()
    if vis is not None:
        report["layers"] = vis.layers
        vis.close()
        if rank == 0:
            torch.save(snapshots, out / f"{flavour}-reference.pt")
    torch.save(_local_state(model, opt), out / f"{flavour}-{phase}-rank{rank}.pt")
    report["hooks"] = hook_counts(model)
    report["all_training"] = all(m.training for m in model.modules())
    return report


def _outcome(fn) -> list[str] | None:
    try:
        fn()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None


def _failures(rank: int, out: Path, flavour: str, report: dict) -> None:
    """Rank 0 fails while logging: strict (every rank raises), then not strict (rank 0 warns, all train on); a bad
    layer name in the constructor; a write that fails on rank 0."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from _models import make_batch

    from cnnvis_tb import Kind, VisLogger

    class Exploding(Kind):
        name, label, every, layer_role = "exploding", "Exploding", 1, None

        def log(self, ctx, out, computed):
            raise ValueError("boom on rank 0")

    def train(vis, steps, model, opt, record):
        for step in range(steps):
            x, y = make_batch(1000 * rank + step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            record["logged"].append(vis.step(step))
            opt.step()
            record["steps_done"] = step + 1

    model = _sharded_model(flavour)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vis = VisLogger(model, out / f"{flavour}-strict", **_vis_options(kinds=["kernels", Exploding()], every=1))
    report["strict_failure"] = _outcome(lambda: train(vis, 2, model, opt, {"logged": []}))
    report["barrier_after_failure"] = dist.barrier() is None  # the group is still usable: nobody is stuck
    vis.close()
    if flavour != "fsdp2":
        return

    vis = VisLogger(model, out / "warn", **_vis_options(kinds=["kernels", Exploding()], every=1, strict=False))
    record = {"logged": [], "steps_done": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(vis, 4, model, opt, record)
        vis.close()
    record["warnings"] = [str(w.message) for w in caught if "cnnvis_tb" in str(w.message)]
    report["warn_failure"] = record

    report["bad_layer"] = _outcome(lambda: VisLogger(model, out / "bad", **_vis_options(layers=["bodyy"])))

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        class FullDisk(SummaryWriter):
            def flush(self):
                raise OSError(28, "No space left on device (disk full, simulated)")

        writer = FullDisk(str(out / "full"))
    vis = VisLogger(model, writer=writer, **_vis_options(kinds=["kernels"], every=1, strict=False))
    gathers = 0
    original = vis._sharded.gather

    def counted():
        nonlocal gathers
        gathers += 1
        return original()

    vis._sharded.gather = counted
    record = {"logged": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(vis, 3, model, opt, record)
        vis.close()
    record.update(
        warnings=[str(w.message) for w in caught if "cnnvis_tb" in str(w.message)],
        stopped=vis._sharded.stopped,
        gathers=gathers,
    )
    report["write_failure"] = record


def _main(rank: int, out: Path) -> dict:
    reports = {}
    for flavour in FLAVOURS:
        report = {}
        for phase in ("plain", "logger"):
            report[phase] = _train(rank, out, flavour, phase)
        logged = report.pop("logger")
        reports[flavour] = {
            "logged": logged["logged"],
            "layers": logged["layers"],
            "all_training": logged["all_training"],
            "hooks_as_without_logger": logged["hooks"] == report["plain"]["hooks"],
        }
        if flavour != "fsdp1-orig":
            _failures(rank, out, flavour, reports[flavour])
    return reports


def _careless(rank: int) -> dict:
    """Rank 0 runs the sharded model on the probe by itself: FSDP2's all-gathers have no partner."""
    import torch.nn.functional as F
    from _models import make_batch

    model = _sharded_model("fsdp2")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe, _ = make_batch(99, n=2)
    for step in range(3):
        x, y = make_batch(1000 * rank + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            with torch.no_grad():
                model(probe)
    return {}


def _lightning(rank: int, out: Path) -> dict:
    """Lightning's ModelParallelStrategy (FSDP2 through ``configure_model``) on CPU: a fit without and one with
    ``CnnVisCallback``, from the same seed; the ranks' final shards are saved."""
    import lightning as L
    from _models import TinyCNN, make_batch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from cnnvis_tb.integrations.lightning import CnnVisCallback

    class LitTiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for unit in (self.net.stem, self.net.body, self):
                fully_shard(unit, mesh=mesh)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Recording(CnnVisCallback):
        seen: list[bool] = []

        def on_train_batch_end(self, trainer, *args):
            self.seen.append(self.vis is not None)
            super().on_train_batch_end(trainer, *args)

    from lightning.pytorch.strategies import FSDPStrategy

    report = {
        "fsdp_strategy_on_cpu": [
            _outcome(lambda s=strategy: L.Trainer(accelerator="cpu", devices=WORLD, strategy=s, logger=False))
            for strategy in ("fsdp", FSDPStrategy())
        ]
    }
    x, y = make_batch(0, n=64)
    for phase in ("plain", "logger"):
        L.seed_everything(7, verbose=False)
        model = LitTiny()
        initial = model.net.stem[0].weight.detach().clone()
        callbacks = []
        if phase == "logger":
            probe, labels = make_batch(99, n=2)
            callbacks = [
                Recording(
                    probe=probe,
                    probe_labels=labels,
                    strict=True,
                    every=2,
                    log_dir=out / "vis",
                    kinds=["kernels", "gradcam", "histograms"],
                )
            ]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
            max_steps=LIGHTNING_STEPS,
            logger=False,
            callbacks=callbacks,
            default_root_dir=out / "root",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        trainer.fit(model, loader)
        if phase == "logger":
            report["vis_on_rank"] = len(Recording.seen) == LIGHTNING_STEPS and all(Recording.seen)
        else:
            with torch.no_grad():  # a collective on both ranks
                report["trained"] = not torch.equal(model.net.stem[0].weight.full_tensor(), initial)
        state = {f"param:{n}": _local(p) for n, p in model.named_parameters()}
        state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
        state["rng"] = torch.get_rng_state()
        torch.save(state, out / f"lightning-{phase}-rank{rank}.pt")
    return report


def _worker(rank: int, out: Path, mode: str, pg_timeout: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if mode == "lightning":
        report = _lightning(rank, out)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=pg_timeout))
        report = _main(rank, out) if mode == "main" else _careless(rank)
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["main", "careless", "lightning"], required=True)
    parser.add_argument("--pg-timeout", type=float, default=60)
    args = parser.parse_args()
    _worker(args.rank, args.out, args.mode, args.pg_timeout)
