"""A full or read-only disk in each writer: one-line WriteError, previous state intact.

The failure is injected where the operating system would report it (the write of a file, the
``fallocate`` that reserves a database's blocks, tifffile's write of a TIFF), half-way through
the bytes where that makes sense. tests/faults/test_tmpfs.py does the same on a real, small
tmpfs.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import tifffile
import torch

from scarce import atomic, io
from scarce.align.stack import ingest_stack
from scarce.data.ingest import ingest
from scarce.data.store import read_metadata
from scarce.engine.checkpoint import load_checkpoint, save_checkpoint
from scarce.errors import WriteError
from scarce.segment.predict import predict_files
from tests import hostile
from tests.segment.test_predict import tiny_unet, write_checkpoint


def _only(folder) -> list[str]:
    """Names in ``folder``, hidden ones included (temporary files would show here)."""
    return sorted(p.name for p in folder.iterdir())


def _one_line(error: pytest.ExceptionInfo, *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")]
)
def test_checkpoint_writer(tmp_path, monkeypatch, code, reason):
    path = save_checkpoint(
        tmp_path / "last.pt", {"model_state": {"w": torch.ones(1000)}, "step": 5}
    )
    before = path.read_bytes()
    monkeypatch.setattr(atomic, "open", hostile.failing_open(code), raising=False)
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, {"model_state": {"w": torch.zeros(1000)}, "step": 10})
    _one_line(caught, str(path), reason)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 5
    assert _only(tmp_path) == ["last.pt"]


def _images(root, n: int = 3):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tifffile.imwrite(root / "images" / f"img{i}.tif", np.full((32, 32), i + 1, np.uint8))
        tifffile.imwrite(root / "masks" / f"img{i}.tif", np.eye(32, dtype=np.uint8))
    return root / "images", root / "masks"


def test_ingest_writer_keeps_the_old_database(tmp_path, monkeypatch):
    images, masks = _images(tmp_path / "data")
    out = tmp_path / "out" / "db"
    ingest(images, masks, out, train_fraction=1.0, progress=False)
    created = read_metadata(out / "train.lmdb")["created"]
    monkeypatch.setattr(atomic, "_fallocate", lambda fd, n: errno.ENOSPC)
    with pytest.raises(WriteError) as caught:
        ingest(images, masks, out, train_fraction=1.0, progress=False, overwrite=True)
    _one_line(caught, "no space left on device", "needed", f"{out} was left as it was")
    monkeypatch.undo()
    assert read_metadata(out / "train.lmdb")["created"] == created  # the old database, whole
    assert _only(tmp_path / "out") == ["db"]  # no temporary folder left


def test_stack_ingest_writer(tmp_path, monkeypatch):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32))
    monkeypatch.setattr(atomic, "_fallocate", lambda fd, n: errno.EDQUOT)
    with pytest.raises(WriteError) as caught:
        ingest_stack(stack, tmp_path / "db")
    _one_line(caught, "disk quota exceeded")
    assert _only(tmp_path) == ["stack.tif"]


def test_prediction_writer_leaves_complete_files_only(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "model.pt", tiny_unet())
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(
            folder / f"im{i}.tif", np.random.default_rng(i).random((64, 64), np.float32)
        )
    out = tmp_path / "out"
    out.mkdir()
    io.write_label_image(out / "im1.tif", np.full((64, 64), 7, np.uint8))  # an earlier result
    real, calls = tifffile.imwrite, []

    def imwrite(path, data, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second image: half written, then the disk is full
            with open(path, "wb") as fh:
                fh.write(b"II*\x00" + bytes(100))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, **kw)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(WriteError) as caught:
        predict_files(ckpt, folder, out, progress=False)
    _one_line(caught, str(out / "im1.tif"), "no space left", "needed")
    monkeypatch.undo()
    assert _only(out) == ["im0.tif", "im1.tif"]  # no temporary file, no im2 yet
    assert io.read_mask(out / "im0.tif").shape == (64, 64)  # complete
    assert (io.read_mask(out / "im1.tif") == 7).all()  # the earlier result, untouched
