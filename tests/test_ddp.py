"""DistributedDataParallel on 2 CPU processes (gloo): the logger writes on rank 0 only, makes no collective call,
and leaves training bit-identical.

Each training run starts two fresh processes executing this file as a script (``python test_ddp.py --worker ...``),
so a hang fails the test after a timeout instead of blocking the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _models import RunFailed, finish_ranks

STEPS = 4
WORLD = 2
TIMEOUT = 120  # seconds for a whole 2-process run
KINDS = ("kernels", "features", "gradcam", "saliency", "actmax", "histograms")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, mode: str, *, pg_timeout: float = 60) -> list[subprocess.Popen]:
    """Start the WORLD processes of one distributed run."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--rank", str(rank), "--out", str(out), "--mode", mode,
             "--pg-timeout", str(pg_timeout)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]


def _finish(procs: list[subprocess.Popen], out: Path, *, timeout: float = TIMEOUT) -> list[dict]:
    """Wait for a run; returns each rank's report (see ``_models.finish_ranks``)."""
    return finish_ranks(procs, out, timeout=timeout)


def _events_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def careless(tmp_path_factory):
    """The negative control, started first: it spends most of its time waiting for gloo's timeout."""
    out = tmp_path_factory.mktemp("careless")
    procs = _start(out, "careless", pg_timeout=5)
    yield procs, out
    for p in procs:  # when its test was not run
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def run(tmp_path_factory, careless):
    """Both ranks train twice in one process pair: without the logger, then with it on every rank (every kind
    at every step, strict); everything random is re-seeded and the model and its DDP wrapper are built anew."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _finish(_start(out, "compare"), out)


def test_training_is_bit_identical_with_the_logger(run):
    out, _ = run
    plain, logged, initial = (torch.load(out / f"{name}.pt") for name in ("plain", "logger", "initial"))
    assert plain.keys() == logged.keys()
    for name in plain:
        assert torch.equal(plain[name], logged[name]), f"{name} differs"
    # The comparison can fail: training moved the parameters and the BatchNorm statistics.
    for name in ("stem.0.weight", "stem.1.running_mean", "stem.1.num_batches_tracked"):
        assert not torch.equal(plain[name], initial[name]), name


def test_only_rank_zero_writes_one_event_stream(run):
    out, reports = run
    files = _events_files(out)
    assert len(files) == 1, f"expected one events file, found {[str(f.relative_to(out)) for f in files]}"
    assert files[0].parent == out / "runs"
    assert reports[0]["logged"] == [True] * STEPS
    assert reports[1]["logged"] == [False] * STEPS  # rank 1 does no logging work at all


def test_events_hold_images_at_every_step(run):
    from _models import read_events

    acc = read_events(run[0] / "runs")
    tags = acc.Tags()["images"]
    assert {t.split("/")[1] for t in tags} == {"kernels", "features", "gradcam", "saliency", "actmax"}
    assert "cnnvis/gradcam/body/probe_000" in tags  # layer names of the unwrapped model (no "module." prefix)
    for tag in tags:
        first = 1 if tag.startswith("cnnvis/actmax/") else 0  # the schedule starts actmax at its interval
        assert [e.step for e in acc.Images(tag)] == list(range(first, STEPS)), tag


def test_a_collective_from_rank_zero_alone_is_caught(careless):
    """The harness detects what the logger must never do: rank 0 alone running the DDP wrapper's forward
    (as a visual that did not unwrap the model would) desynchronizes the ranks: an error or a hang. How gloo
    reports it depends on timing (under load the peer may close the connection before the timeout fires); any of
    its desynchronization errors counts, and a run that finishes cleanly fails this test."""
    with pytest.raises(RunFailed, match="Timed out|did not finish|Connection closed by peer|Connection reset"):
        _finish(*careless, timeout=60)


# ---------------------------------------------------------------------- the worker (runs in each process)
def _train(rank: int, out: Path, *, with_logger: bool = False, careless: bool = False) -> tuple[list[bool], torch.nn.Module]:
    """STEPS steps of DDP training from a fixed seed; rank 0 saves the initial state once. Returns vis.step()'s
    answers (whether this rank logged) at each step."""
    import torch.nn.functional as F
    from _models import TinyCNN, make_batch
    from torch.nn.parallel import DistributedDataParallel

    from cnnvis_tb import VisLogger

    torch.manual_seed(0)
    model = TinyCNN()
    if rank == 0 and not (out / "initial.pt").exists():
        torch.save(model.state_dict(), out / "initial.pt")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    probe, labels = make_batch(99, n=2)
    vis = None
    if with_logger:  # the same call on every rank, as a user would write it
        vis = VisLogger(ddp, out / "runs", probe=probe, probe_labels=labels, every=1, kinds=KINDS, strict=True,
                        actmax_steps=2, actmax_channels=1, top_k=2)
    logged = []
    for step in range(STEPS):
        x, y = make_batch(1000 * rank + step)  # each rank its own data: gradients are really all-reduced
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if vis is not None:
            logged.append(vis.step(step))
        if careless and rank == 0:
            ddp(probe)  # a forward through the wrapper on one rank: DDP broadcasts buffers (a collective)
    if vis is not None:
        vis.close()
    return logged, model


def _worker(rank: int, out: Path, mode: str, pg_timeout: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=pg_timeout))
    report = {}
    phases = [("plain", {}), ("logger", {"with_logger": True})] if mode == "compare" else [
        ("careless", {"careless": True})]
    for name, options in phases:
        report[name], model = _train(rank, out, **options)
        dist.barrier()
        if rank == 0:
            torch.save(model.state_dict(), out / f"{name}.pt")
    report["logged"] = report.get("logger")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["compare", "careless"], required=True)
    parser.add_argument("--pg-timeout", type=float, default=60)
    args = parser.parse_args()
    _worker(args.rank, args.out, args.mode, args.pg_timeout)
