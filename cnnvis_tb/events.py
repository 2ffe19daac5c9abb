"""Writing pictures into TensorBoard event files, cheaply.

The events are exactly those of ``SummaryWriter.add_image`` (one image ``Summary`` value per tag, a PNG inside),
so every reader of event files (TensorBoard's Images tab, EventAccumulator, tbparse, our tab) reads them alike.
Only the work is cheaper, and it is done on the training thread, so it is the logger's cost:

* **PNG encoding.** ``add_image`` has Pillow choose among five row filters for every row and compress at zlib
  level 6. We use one filter ("Up": each row minus the row above, one array subtraction) and deflate at level 1,
  with Intel's ISA-L (the ``isal`` package) when it is installed: its level-1 deflate writes the same format
  (any PNG reader decodes it) about 4x faster than zlib's level 1, for about 10 % more bytes (the README's
  benchmark section gives the time and size measured on a default demo logging step). Without ``isal`` (or with
  the environment variable ``CNNVIS_TB_FAST_PNG=0``) zlib's level 1 is used.
* **Record checksums.** Without TensorFlow, TensorBoard checksums every event record (CRC-32C) in pure Python:
  2.3 ms per 15 kB picture, in the writer's thread, holding the GIL the training thread needs. When the C
  implementation of ``google-crc32c`` is installed, :func:`use_fast_checksums` routes TensorBoard's checksum
  function there: the same values (checked on test data before switching), for every writer in the process.
  Set the environment variable ``CNNVIS_TB_FAST_CRC=0`` to keep TensorBoard's own.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["encode_png", "add_png", "PictureWriter", "use_fast_checksums"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflater():
    """``compress(data, level)`` writing a zlib stream: ISA-L's when ``isal`` is installed (see the module docs)."""
    if os.environ.get("CNNVIS_TB_FAST_PNG", "1") != "0":
        try:
            from isal import isal_zlib

            return isal_zlib.compress
        except ImportError:
            pass
    return zlib.compress


_deflate = _deflater()


def encode_png(image: torch.Tensor, level: int = 1) -> bytes:
    """PNG bytes of a ``[C, H, W]`` uint8 picture (C = 1, 3 or 4): 8-bit, every row "Up"-filtered, deflated at
    ``level`` (0-3: ISA-L's levels; zlib takes 0-9).

    Runs in torch and the deflater, which release the GIL, so pictures can be encoded on a helper thread
    (:class:`PictureWriter`) while the caller renders the next one.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"encode_png takes a [C, H, W] uint8 tensor, got {getattr(image, 'dtype', type(image))} "
                         f"of shape {tuple(getattr(image, 'shape', ()))}")
    c, h, w = image.shape
    if c not in _COLOUR_TYPE or h == 0 or w == 0:
        raise ValueError(f"encode_png takes 1, 3 or 4 channels and a non-empty picture, got shape {(c, h, w)}")
    rows = image.detach().cpu().permute(1, 2, 0).contiguous().view(h, w * c)  # [H, W * C]: pixels interleaved
    raw = torch.empty((h, 1 + w * c), dtype=torch.uint8)
    raw[:, 0] = 2  # each row starts with its filter type: 2, "Up"
    raw[0, 1:] = rows[0]  # the row above the first is zeros
    torch.sub(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPE[c], 0, 0, 0)
    body = _deflate(raw.numpy(), level)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def is_torch_writer(writer) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(writer, SummaryWriter)


def _image_summary(tag: str, shape: tuple[int, int, int], png: bytes):
    from tensorboard.compat.proto.summary_pb2 import Summary

    c, h, w = shape
    picture = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=picture)])


def add_png(writer, tag: str, image: torch.Tensor, step: int) -> None:
    """Write one ``[C, H, W]`` uint8 picture now, as ``writer.add_image(tag, image, step)`` would (see
    :class:`PictureWriter`)."""
    pictures = PictureWriter(writer)
    pictures.add(tag, image, step)
    pictures.flush()


_ENCODER: ThreadPoolExecutor | None = None
_ENCODER_LOCK = threading.Lock()


def _encoder() -> ThreadPoolExecutor:
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            _ENCODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cnnvis-png",
                                          initializer=torch.set_num_threads, initargs=(1,))
        return _ENCODER


def _forget_encoder_in_child() -> None:
    """A forked process (DDP or Lightning with the fork start method) has none of its parent's threads: its
    copy of the executor would queue work no thread ever runs. The child starts its own on first use."""
    global _ENCODER, _ENCODER_LOCK
    _ENCODER, _ENCODER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_encoder_in_child)


class PictureWriter:
    """Pictures of one logging step: encoded on helper threads while the caller renders the next picture
    (the caller's rendering runs on one core; the other would idle), written in the order they were added by
    :meth:`flush`, on the caller's thread. Two helpers, so both cores encode while the caller waits. Writers
    other than PyTorch's ``SummaryWriter`` get a plain ``add_image`` call."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self._pending: list[tuple[str, tuple[int, int, int], int, Future]] = []

    def add(self, tag: str, image: torch.Tensor, step: int) -> None:
        if not is_torch_writer(self.writer):
            self.writer.add_image(tag, image, step)
            return
        image = image.detach().cpu()
        try:
            future = _encoder().submit(encode_png, image)
        except RuntimeError:  # the helpers were shut down: interpreter exit, with training still on another thread
            future = Future()
            try:
                future.set_result(encode_png(image))
            except Exception as e:  # raised at flush, as a helper's failure would be
                future.set_exception(e)
        self._pending.append((tag, tuple(image.shape), step, future))

    def wait(self) -> None:
        """Until every picture added so far is encoded (or failed to be: :meth:`flush` raises it)."""
        futures.wait([pending[3] for pending in self._pending])

    def flush(self) -> None:
        """Write every picture added so far, in order; the first error of a picture that could not be encoded
        is raised after all the others are written."""
        pending, self._pending = self._pending, []
        error = None
        for tag, shape, step, future in pending:
            try:
                summary = _image_summary(tag, shape, future.result())
            except Exception as e:
                error = error or e
                continue
            self.writer._get_file_writer().add_summary(summary, step)
        if error is not None:
            raise error


_fast_checksums: bool | None = None


def use_fast_checksums() -> bool:
    """Compute TensorBoard's record checksums with google-crc32c's C code when it is installed (see the module
    docs); returns whether the fast path is in use. Idempotent; nothing changes unless the results agree."""
    global _fast_checksums
    if _fast_checksums is not None:
        return _fast_checksums
    _fast_checksums = False
    if os.environ.get("CNNVIS_TB_FAST_CRC", "1") == "0":
        return False
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(google_crc32c, "implementation", None) != "c":
        return False
    original = record_writer.masked_crc32c

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    samples = [b"", b"\x00", b"cnnvis_tb", bytes(range(256)) * 5, struct.pack("<Q", 123456789)]
    if all(masked_crc32c(s) == original(s) for s in samples):
        masked_crc32c.original = original  # type: ignore[attr-defined]
        record_writer.masked_crc32c = masked_crc32c
        _fast_checksums = True
    return _fast_checksums
