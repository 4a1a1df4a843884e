"""Real full disks (small tmpfs mounts) and damaged database pages.

- ingest, training and prediction writing onto a tmpfs too small for them: exit 2 with one
  line naming the path, the free space and the space needed; what was there before is whole;
- every page of a small database overwritten with random bytes, one at a time: each read ends
  in the data or a StoreError naming the database, never a crash.

The tmpfs tests need permission to mount (root in a container); they are skipped otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from scarce.data.store import SampleStore, read_metadata
from scarce.engine.checkpoint import load_checkpoint
from tests.faults.procs import Run, train_args


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a fresh tmpfs of ``size`` (e.g. ``"1m"``) under ``tmp_path``."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_error_line(output: str, *words: str) -> str:
    lines = [line for line in output.splitlines() if ": error: " in line]
    assert len(lines) == 1, output[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _data(shared_data, root, n):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for path in sorted((shared_data / "nist_rpe" / sub).iterdir())[:n]:
            (root / sub / path.name).symlink_to(path)
    return root


def test_ingest_onto_a_full_disk(shared_data, small_disk, tmp_path, record):
    disk = small_disk("8m")
    small, big = _data(shared_data, tmp_path / "small", 4), _data(shared_data, tmp_path / "big", 60)
    ingest = ["ingest", "--masks"]
    first = Run([*ingest, small / "masks", "--images", small / "images", "--out", disk / "db"],
                tmp_path / "first.txt")  # fmt: skip
    assert first.wait() == 0, first.output()
    created = read_metadata(disk / "db" / "train.lmdb")["created"]
    run = Run([*ingest, big / "masks", "--images", big / "images", "--out", disk / "db",
               "--overwrite"], tmp_path / "full.txt")  # fmt: skip
    assert run.wait() == 2, run.output()
    _one_error_line(run.output(), "no space left on device", "needed", "was left as it was")
    assert read_metadata(disk / "db" / "train.lmdb")["created"] == created
    with SampleStore(disk / "db" / "train.lmdb") as store:
        [store[i] for i in range(len(store))]  # the old database, whole
    assert sorted(p.name for p in disk.iterdir()) == ["db"]
    record("disk full: ingest refused in one line, old database whole")


def test_training_onto_a_full_disk(nist_db, small_disk, tmp_path, record):
    disk = small_disk("600k")
    run = Run(train_args(nist_db, disk / "run", "--max-steps", 200), tmp_path / "log.txt")
    code = run.wait()
    assert code == 2, run.output()[-3000:]
    _one_error_line(run.output(), "no space left on device", str(disk / "run"))
    last = disk / "run" / "checkpoints" / "last.pt"
    if last.exists():
        assert load_checkpoint(last)["step"] % 5 == 0  # the previous checkpoint, whole
    assert run.survivors() == []
    record("disk full: training stopped in one line, last checkpoint whole")


def test_prediction_onto_a_full_disk(shared_data, small_disk, tmp_path, record):
    from tests.segment.test_predict import tiny_unet, write_checkpoint

    model = write_checkpoint(tmp_path / "model.pt", tiny_unet())
    disk = small_disk("256k")
    run = Run(["predict", "--model", model, "--images", shared_data / "nist_rpe" / "images",
               "--out", disk / "out", "--device", "cpu"], tmp_path / "log.txt")  # fmt: skip
    assert run.wait() == 2, run.output()[-3000:]
    _one_error_line(run.output(), "no space left on device", "needed")
    names = [p.name for p in (disk / "out").iterdir()]
    assert names and not [n for n in names if n.startswith(".")]  # no temporary file left
    import tifffile

    for name in names:
        assert tifffile.imread(disk / "out" / name).shape == (256, 256)  # whole
    record("disk full: prediction stopped in one line, written files whole")


SWEEP = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import numpy as np
    from scarce.data.store import SampleStore
    from scarce.errors import StoreError
    source, work = Path(sys.argv[1]), Path(sys.argv[2])
    pages = (source / "data.mdb").stat().st_size // 4096
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for page in range(pages):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source, work)
        with open(work / "data.mdb", "r+b") as fh:
            fh.seek(page * 4096)
            fh.write(rng.bytes(4096))
        try:
            with SampleStore(work) as store:
                [store[i] for i in range(len(store))]
            outcomes["read"] += 1
        except StoreError as exc:
            assert str(work) in str(exc), exc
            outcomes["refused"] += 1
    print(json.dumps({"pages": pages, **outcomes}))
    """
)


def test_every_damaged_page_is_read_or_refused_never_a_crash(nist_db, tmp_path, record):
    source = tmp_path / "train.lmdb"
    shutil.copytree(nist_db / "train.lmdb", source)
    done = subprocess.run(
        [sys.executable, "-c", SWEEP, str(source), str(tmp_path / "work.lmdb")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # a segfault would show as -11
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["read"] + result["refused"] == result["pages"] > 100
    record("damaged LMDB pages: pages overwritten", result["pages"])
    record("damaged LMDB pages: refused with StoreError", result["refused"])
    record("damaged LMDB pages: still read (page unused)", result["read"])
