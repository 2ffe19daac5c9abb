"""Our PNG encoder and event writing: what TensorBoard's own readers get back is exactly the picture we gave."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnvis_tb.events import add_png, encode_png, use_fast_checksums
from tests._models import read_events


@pytest.fixture(params=["isal", "zlib"])
def deflater(request, monkeypatch):
    """Each test using it runs with ISA-L's deflate (installed with the package) and with zlib's fallback."""
    import zlib

    from cnnvis_tb import events

    if request.param == "isal":
        from isal import isal_zlib

        assert events._deflate is isal_zlib.compress  # installed, so in use
    else:
        monkeypatch.setattr(events, "_deflate", zlib.compress)
    return request.param


def test_without_isal_or_when_turned_off_zlib_deflates():
    code = "import zlib; from cnnvis_tb import events; print(events._deflate is zlib.compress)"
    env = {**os.environ, "CNNVIS_TB_FAST_PNG": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
    blocked = ("import sys; sys.modules['isal'] = None; import zlib; from cnnvis_tb import events; "
               "print(events._deflate is zlib.compress)")
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("h, w", [(1, 1), (7, 13), (70, 452)])
def test_encode_png_decodes_to_the_same_pixels(channels, mode, h, w, deflater):
    image = torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    decoded = Image.open(io.BytesIO(encode_png(image)))
    assert decoded.mode == mode and decoded.size == (w, h)
    pixels = np.asarray(decoded)
    expected = image.permute(1, 2, 0).numpy()
    assert np.array_equal(pixels.reshape(expected.shape), expected)


def test_encode_png_rejects_what_it_cannot_encode():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        encode_png(torch.zeros(2, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("content", ["blocks", "smooth"])
def test_pictures_come_out_about_as_small_as_add_image_makes_them(content, deflater):
    gen = torch.Generator().manual_seed(0)
    if content == "blocks":  # nearest-neighbour tiles of a colormap, as kernel grids and feature panels are drawn
        small = torch.randint(0, 256, (3, 6, 40), dtype=torch.uint8, generator=gen)
        picture = small.repeat_interleave(8, 1).repeat_interleave(8, 2)
    else:  # a blurred, photo-like picture, as Grad-CAM overlays are
        noise = torch.rand(1, 3, 12, 40, generator=gen)
        picture = (torch.nn.functional.interpolate(noise, size=(96, 320), mode="bicubic") * 255).clamp(0, 255)
        picture = picture[0].round().to(torch.uint8)
    ours = len(encode_png(picture))
    buf = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(buf, format="PNG")  # what add_image does
    # One fixed filter at deflate level 1 trades some size for much less time; a broken filter would be far bigger.
    assert ours <= 1.35 * len(buf.getvalue())


def test_add_png_events_read_back_by_tensorboard_equal_add_image(tmp_path):
    image = torch.randint(0, 256, (3, 9, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    writer = SummaryWriter(str(tmp_path))
    add_png(writer, "cnnvis/test/ours", image, 3)
    writer.add_image("cnnvis/test/stock", image, 3)
    writer.close()
    acc = read_events(tmp_path)
    ours, stock = acc.Images("cnnvis/test/ours")[0], acc.Images("cnnvis/test/stock")[0]
    assert (ours.step, ours.width, ours.height) == (stock.step, stock.width, stock.height) == (3, 17, 9)
    decode = lambda e: np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))  # noqa: E731
    assert np.array_equal(decode(ours), image.permute(1, 2, 0).numpy())
    assert np.array_equal(decode(ours), decode(stock))


def test_add_png_falls_back_to_add_image_for_other_writers():
    calls = []

    class OtherWriter:
        def add_image(self, tag, image, step):
            calls.append((tag, tuple(image.shape), step))

    add_png(OtherWriter(), "t", torch.zeros(3, 2, 2, dtype=torch.uint8), 5)
    assert calls == [("t", (3, 2, 2), 5)]


def test_fast_checksums_give_tensorboards_values_and_readable_files(tmp_path):
    pytest.importorskip("google_crc32c")
    from tensorboard.summary.writer import record_writer

    assert use_fast_checksums(), "google-crc32c's C implementation is a dependency and should be in use"
    fast = record_writer.masked_crc32c
    slow = fast.original
    gen = np.random.default_rng(0)
    for n in (0, 1, 8, 12, 1000, 15_000):
        data = gen.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert fast(data) == slow(data)
    assert fast(struct.pack("<Q", 15_000)) == slow(struct.pack("<Q", 15_000))
    writer = SummaryWriter(str(tmp_path))  # TensorBoard's reader checks every record's checksum
    writer.add_scalar("x", 1.5, 0)
    add_png(writer, "p", torch.zeros(3, 4, 4, dtype=torch.uint8), 0)
    writer.close()
    acc = read_events(tmp_path)
    assert acc.Scalars("x")[0].value == 1.5 and len(acc.Images("p")) == 1


def test_fast_checksums_can_be_turned_off():
    code = (
        "from cnnvis_tb.events import use_fast_checksums; "
        "from tensorboard.summary.writer import record_writer as r; "
        "print(use_fast_checksums(), hasattr(r.masked_crc32c, 'original'))"
    )
    env = {**os.environ, "CNNVIS_TB_FAST_CRC": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_picture_writer_writes_in_the_order_added_and_reports_a_bad_picture_last(tmp_path):
    from cnnvis_tb.events import PictureWriter

    writer = SummaryWriter(str(tmp_path))
    pictures = PictureWriter(writer)
    sizes = [(3, 40 + 7 * i, 30) for i in range(12)]
    for i, shape in enumerate(sizes):
        pictures.add(f"p/{i:02d}", torch.full(shape, i * 20, dtype=torch.uint8), i)
        if i == 5:
            pictures.add("bad", torch.zeros(3, 4, 4), i)  # float: encode_png refuses it
    with pytest.raises(ValueError, match="uint8"):
        pictures.flush()
    pictures.flush()  # nothing left
    writer.close()
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["images"]) == [f"p/{i:02d}" for i in range(12)]
    for i, shape in enumerate(sizes):
        (event,) = acc.Images(f"p/{i:02d}")
        assert (event.step, event.height) == (i, shape[1])
        assert np.asarray(Image.open(io.BytesIO(event.encoded_image_string))).max() == i * 20
    # The order in the file is the order of add(), whatever order the helper threads finished in.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = list(tmp_path.glob("events.out.tfevents.*"))
    order = [v.tag for e in EventFileLoader(str(path)).Load() for v in e.summary.value]
    assert order == [f"p/{i:02d}" for i in range(12)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_pictures_are_written_in_a_process_forked_after_the_encoder_started(tmp_path):
    """DDP and Lightning can fork after the parent logged: the child must not wait on the parent's threads."""
    from cnnvis_tb.events import PictureWriter

    parent = SummaryWriter(str(tmp_path / "parent"))
    PictureWriter(parent).add("p", torch.zeros(3, 4, 4, dtype=torch.uint8), 0)  # starts the helper threads
    code = (
        "import sys, torch; sys.path.insert(0, {!r})\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from cnnvis_tb.events import PictureWriter\n"
        "import os, multiprocessing as mp\n"
        "pw = PictureWriter(SummaryWriter({!r})); pw.add('a', torch.zeros(3, 4, 4, dtype=torch.uint8), 0); pw.flush()\n"
        "def child(d):\n"
        "    w = SummaryWriter(d); p = PictureWriter(w); p.add('c', torch.ones(3, 4, 4, dtype=torch.uint8), 1)\n"
        "    p.flush(); w.close()\n"
        "proc = mp.get_context('fork').Process(target=child, args=({!r},)); proc.start(); proc.join(60)\n"
        "print(proc.exitcode)\n"
    ).format(os.getcwd(), str(tmp_path / "a"), str(tmp_path / "child"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1:] == ["0"], out.stderr[-2000:]
    assert len(read_events(tmp_path / "child").Images("c")) == 1
