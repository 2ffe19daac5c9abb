"""Logging to S3: a real S3-compatible server (moto's server mode) started on 127.0.0.1 by the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from _models import TinyCNN, decode_png, make_batch
from conftest import free_port, get_json

from cnnvis_tb import VisLogger


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """An S3-compatible endpoint on a free local port, for this module's tests."""
    _require("moto")
    _require("boto3")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The environment TensorBoard's S3 layer reads (also inherited by a TensorBoard subprocess), and a bucket."""
    import boto3

    for key, value in {"S3_ENDPOINT": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    from tensorboard.compat.tensorflow_stub.io import gfile

    # TensorBoard's S3 layer reads S3_ENDPOINT once, when it is first imported (here: by earlier tests, in this
    # process); a user sets it before starting Python. The TensorBoard subprocess reads it from the environment.
    monkeypatch.setattr(gfile.get_filesystem("s3://runs"), "_s3_endpoint", s3_server)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="runs")
    return client


def test_events_written_to_s3_read_back_and_no_local_folder(s3, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    probe, labels = make_batch(0, n=2)
    with VisLogger(TinyCNN(), "s3://runs/exp1", probe=probe, probe_labels=labels, every=1, strict=True,
                   kinds=["gradcam", "kernels", "histograms"]) as vis:
        for step in range(3):
            vis.step(step)
    assert list(tmp_path.iterdir()) == []  # no folder named 's3:' here
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="exp1/")["Contents"]]
    assert any("tfevents" in k for k in keys)
    acc = EventAccumulator("s3://runs/exp1", size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [0, 1, 2]
    assert decode_png(acc.Images("cnnvis/kernels/stem.0/grid")[-1].encoded_image_string).shape[2] == 3
    assert "cnnvis/histograms/head/weight" in acc.Tags()["histograms"]


def test_tensorboard_over_s3_serves_the_tab(s3, start_tensorboard):
    probe, labels = make_batch(1, n=2)
    with VisLogger(TinyCNN(), "s3://runs/served/run_a", probe=probe, probe_labels=labels, every=1, strict=True,
                   kinds=["gradcam"]) as vis:
        vis.step(0)
        vis.step(1)
    server = start_tensorboard("s3://runs/served", "--load_fast=false", plugin="cnnvis", timeout=90)
    index = get_json(f"{server.url}/data/plugin/cnnvis/index")
    assert index["runs"] == ["run_a"] and [k["kind"] for k in index["kinds"]] == ["gradcam"]
    query = urllib.parse.urlencode({"run": "run_a", "tag": "cnnvis/gradcam/body/probe_001", "step": "1"})
    with urllib.request.urlopen(f"{server.url}/data/plugin/cnnvis/image?{query}", timeout=30) as answer:
        assert answer.headers["Content-Type"] == "image/png"
        assert decode_png(answer.read()).shape[1] > 96


def test_a_missing_bucket_or_endpoint_fails_in_the_constructor(s3, monkeypatch):
    probe, _ = make_batch(2, n=2)
    with pytest.raises(ValueError, match=r"log_dir 's3://no-such-bucket/x' cannot be reached .*NoSuchBucket"):
        VisLogger(TinyCNN(), "s3://no-such-bucket/x", probe=probe)
    from tensorboard.compat.tensorflow_stub.io import gfile

    monkeypatch.setattr(gfile.get_filesystem("s3://runs"), "_s3_endpoint", f"http://127.0.0.1:{free_port()}")  # no one
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"cannot be reached .*S3_ENDPOINT"):
        VisLogger(TinyCNN(), "s3://runs/x", probe=probe)
    assert time.monotonic() - start < 30


def test_a_store_without_its_package_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gcsfs(name, *args, **kwargs):
        if name.split(".")[0] == "gcsfs":
            raise ImportError("No module named 'gcsfs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    probe, _ = make_batch(3, n=2)
    with pytest.raises(ValueError, match=r"log_dir 'gs://bucket/run' needs gcsfs .*pip install gcsfs"):
        VisLogger(TinyCNN(), "gs://bucket/run", probe=probe)
