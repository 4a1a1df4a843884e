"""``kill -9`` at seeded random moments of ``scarce ingest``, ``scarce predict`` and ``scarce align``.

After each kill the output is the previous good state: the old database (or none, never half
of one), complete prediction files (or none) under their final names. The next run sweeps what
the killed one left, says so, and succeeds.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import tifffile

from scarce.atomic import parse_temp
from scarce.data.store import SampleStore, read_metadata
from scarce.io import read_mask
from tests.faults.procs import Run

KILLS = 6


def _subset(shared_data, root, dataset: str, n: int):
    """Symlinks to the first ``n`` image/mask pairs of a real dataset."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for path in sorted((shared_data / dataset / sub).iterdir())[:n]:
            (root / sub / path.name).symlink_to(path)
    return root


def _whole(db_dir) -> str:
    """Check every record of every database in ``db_dir``; return its creation time."""
    for db in sorted(db_dir.glob("*.lmdb")):
        with SampleStore(db) as store:
            for i in range(len(store)):
                store[i]  # CRC-checked
    return read_metadata(db_dir / "train.lmdb")["created"]


def _ingest(data, out, log, *extra) -> Run:
    return Run(
        ["ingest", "--images", data / "images", "--masks", data / "masks", "--out", out,
         "--mask-kind", "instance", "--seed", 1, *extra],
        log,
    )  # fmt: skip


def test_kill_9_during_ingest_leaves_the_old_database_or_none(shared_data, tmp_path, record):
    data = _subset(shared_data, tmp_path / "data", "bbbc039", 60)
    out = tmp_path / "dbs" / "db"
    first = _ingest(data, out, tmp_path / "first.txt")
    start = time.monotonic()
    assert first.wait() == 0, first.output()
    seconds = time.monotonic() - start
    rng = np.random.default_rng(7)
    for kill in range(KILLS):
        before = _whole(out)
        run = _ingest(data, out, tmp_path / f"kill{kill}.txt", "--overwrite")
        try:
            time.sleep(rng.uniform(0.3, seconds))
            if run.proc.poll() is None:
                run.kill()
                record("ingest: SIGKILL at a random moment")
            assert run.survivors() == []
            after = _whole(out)  # the old database or the new one: whole either way
            assert after == before or run.proc.returncode == 0
        finally:
            run.end()
    left = [p for p in out.parent.iterdir() if parse_temp(p.name)]
    final = _ingest(data, out, tmp_path / "final.txt", "--overwrite")
    assert final.wait() == 0, final.output()
    _whole(out)
    assert [p.name for p in out.parent.iterdir()] == ["db"]  # every leftover swept
    if left:
        assert "(no longer running)" in final.output()
    record("ingest: killed ingests followed by a successful one", 1)


def test_kill_9_during_a_first_ingest_leaves_no_database(shared_data, tmp_path, record):
    data = _subset(shared_data, tmp_path / "data", "bbbc039", 40)
    out = tmp_path / "dbs" / "db"
    rng = np.random.default_rng(8)
    timed = _ingest(data, out, tmp_path / "timed.txt")
    start = time.monotonic()
    assert timed.wait() == 0, timed.output()
    seconds = time.monotonic() - start
    for kill in range(3):
        shutil.rmtree(out)
        run = _ingest(data, out, tmp_path / f"kill{kill}.txt")
        try:
            time.sleep(rng.uniform(0.3, seconds))
            if run.proc.poll() is None:
                run.kill()
                record("ingest: SIGKILL at a random moment")
            assert not out.exists() or _whole(out)  # none, or a whole one
            if not out.exists():
                out.mkdir()  # so that rmtree above has something to remove
        finally:
            run.end()
    shutil.rmtree(out)
    again = _ingest(data, out, tmp_path / "again.txt")
    assert again.wait() == 0, again.output()
    _whole(out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.segment.test_predict import tiny_unet, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", tiny_unet())


def _outputs_whole(out) -> int:
    """Every file under a final name is a whole label image; count them."""
    whole = 0
    for path in out.iterdir():
        if path.name.startswith("."):
            assert parse_temp(path.name), f"unexpected hidden file {path.name}"
            continue
        shape = tifffile.imread(path).shape  # a half-written TIFF would not read
        assert shape == ((2, 256, 256) if path.stem.endswith("_prob") else (256, 256)), path
        whole += 1
    return whole


def _kill_at_random_moments(args, tmp_path, kind: str, kills: int, seed: int, check, record):
    """Run ``scarce ARGS`` once to time it, then ``kills`` times killed at a random moment
    of that duration (``check()`` after each), then once more to the end."""
    rng = np.random.default_rng(seed)
    first = Run(args, tmp_path / "first.txt")
    start = time.monotonic()
    assert first.wait() == 0, first.output()
    seconds = time.monotonic() - start
    for kill in range(kills):
        run = Run(args, tmp_path / f"kill{kill}.txt")
        try:
            time.sleep(rng.uniform(0.1 * seconds, 0.7 * seconds))
            if run.proc.poll() is None:
                run.kill()
                record(f"{kind}: SIGKILL at a random moment")
            assert run.survivors() == []
            check()
        finally:
            run.end()
    final = Run(args, tmp_path / "final.txt")
    assert final.wait() == 0, final.output()
    return final


def test_kill_9_during_predict_leaves_only_whole_files(shared_data, model, tmp_path, record):
    images = shared_data / "nist_rpe" / "images"
    out = tmp_path / "out"
    args = ["predict", "--model", model, "--images", images, "--out", out, "--device", "cpu",
            "--probabilities"]  # fmt: skip
    _kill_at_random_moments(
        args, tmp_path, "predict", KILLS, 11, lambda: _outputs_whole(out), record
    )
    assert _outputs_whole(out) == 2 * len(list(images.iterdir()))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # leftovers swept


def test_kill_9_during_align_leaves_no_partial_output(shared_data, tmp_path, record):
    from scarce.align.stack import ingest_stack
    from scarce.align.task import align_train
    from tests.align.test_task import tiny

    folder = shared_data / "isbi2012" / "unlabeled"
    slices = np.stack([read_mask(folder / f"{z:02d}.png")[:128, :128] for z in range(8)])
    tifffile.imwrite(tmp_path / "stack.tif", slices, photometric="minisblack")
    ingest_stack(tmp_path / "stack.tif", tmp_path / "db", test_slices="6:8")
    db = tmp_path / "db"
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "run", tiny(max_steps=2))
    out = tmp_path / "out"
    args = ["align", "--model", tmp_path / "run", "--stack", tmp_path / "stack.tif", "--out", out,
            "--fine-tune-steps", "10", "--device", "cpu"]  # fmt: skip

    def whole():
        for name in ("aligned.tif", "fields.tif"):
            tifffile.imread(out / name)  # the first run's outputs, or a later run's: whole
        assert all(parse_temp(p.name) for p in out.iterdir() if p.name.startswith("."))

    _kill_at_random_moments(args, tmp_path, "align", 3, 5, whole, record)
    assert tifffile.imread(out / "aligned.tif").shape == (8, 128, 128)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
