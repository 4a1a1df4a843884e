"""Tests of scarce.segment.readers on small LMDB databases built from real images (nist_rpe, bbbc039)."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from scarce.config import AugmentConfig, DataConfig, LossConfig, TrainConfig
from scarce.data import workers
from scarce.data.ingest import ingest
from scarce.data.monitor import StarvationMonitor, format_benchmark
from scarce.data.normalize import normalization_spec
from scarce.data.store import (
    METADATA_KEY,
    SampleStore,
    StoreError,
    open_env,
    read_metadata,
)
from scarce.data.workers import resolve_reader_count
from scarce.io import list_image_files
from scarce.segment.readers import (
    benchmark_readers,
    iter_test_images,
    make_train_loader,
    normalization_spec_for,
)
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def ingested(tmp_path_factory, name: str, count: int, mask_kind: str) -> Path:
    """``train.lmdb`` of the first ``count`` pairs of a real dataset, written by ``ingest``."""
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data {folder} is absent (see ../shared/data/{name}/README.md)")
    root = tmp_path_factory.mktemp(name)
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for f in list_image_files(folder / sub)[:count]:
            (root / sub / f.name).symlink_to(f)
    ingest(
        root / "images",
        root / "masks",
        root / "db",
        train_fraction=1.0,
        mask_kind=mask_kind,
        progress=False,
    )
    return root / "db" / "train.lmdb"


@pytest.fixture(scope="module")
def nist_lmdb(tmp_path_factory) -> Path:
    """20 nist_rpe images (256 x 256 uint16, classes 0/1)."""
    return ingested(tmp_path_factory, "nist_rpe", 20, "class")


@pytest.fixture(scope="module")
def bbbc_lmdb(tmp_path_factory) -> Path:
    """3 bbbc039 images (520 x 696 uint16) with instance masks."""
    return ingested(tmp_path_factory, "bbbc039", 3, "instance")


def small_cfg(**data) -> TrainConfig:
    fields = {"patch_size": 64, "batch_size": 4, "reader_count": 0, "prefetch_batches": 2} | data
    return TrainConfig(seed=7, data=DataConfig(**fields))


def spec_for(cfg: TrainConfig, db: Path) -> dict:
    return normalization_spec(cfg.data.normalization, cfg.data.percentiles, read_metadata(db))


def first_batches(db: Path, cfg: TrainConfig, count: int, start_batch: int = 0) -> list[dict]:
    with make_train_loader(db, cfg, norm_spec=spec_for(cfg, db), start_batch=start_batch) as it:
        return [next(it) for _ in range(count)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Deadline:
    """Raise TimeoutError in the main thread after ``seconds`` so a test cannot hang."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fire(signum, frame):
            raise TimeoutError(f"no error within {self.seconds} s: the reader hangs")

        self.previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_batches_have_the_documented_shapes_and_dtypes(nist_lmdb):
    batch = first_batches(nist_lmdb, small_cfg(), 1)[0]
    assert set(batch) == {"image", "target"}
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (4, 64, 64) and batch["target"].dtype == torch.int64
    assert set(batch["target"].unique().tolist()) <= {0, 1}
    assert torch.isfinite(batch["image"]).all()
    # z-scored patches of different images: centred near 0 with unit-order spread
    assert abs(batch["image"].mean().item()) < 1.5 and 0.2 < batch["image"].std().item() < 5


def test_same_seed_gives_identical_batches_for_any_reader_count(nist_lmdb):
    streams = [first_batches(nist_lmdb, small_cfg(reader_count=n), 5) for n in (0, 1, 2)]
    assert all(b["target"].dtype == torch.int64 for batches in streams for b in batches)
    for batches in streams[1:]:
        assert all(same(a, b) for a, b in zip(streams[0], batches))
    other = first_batches(nist_lmdb, replace(small_cfg(), seed=8), 1)[0]
    assert not same(other, streams[0][0])


def test_workers_draw_different_samples(nist_lmdb):
    batches = first_batches(nist_lmdb, small_cfg(reader_count=2), 6)
    # batches 0, 2, 4 come from worker 0 and 1, 3, 5 from worker 1 (NIST forked identical ones)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(batches[i]["image"], batches[j]["image"]), (i, j)


def test_start_batch_resumes_the_stream_exactly(nist_lmdb):
    stream = first_batches(nist_lmdb, small_cfg(), 5)
    resumed = first_batches(nist_lmdb, small_cfg(reader_count=2), 2, start_batch=3)
    assert same(stream[3], resumed[0]) and same(stream[4], resumed[1])


def test_ranks_draw_different_batches(nist_lmdb):
    cfg = small_cfg()
    with make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb), rank=1) as it:
        rank1 = next(it)
    assert not same(rank1, first_batches(nist_lmdb, cfg, 1)[0])


def test_balance_classes_raises_the_rare_class_fraction(nist_lmdb):
    counts = read_metadata(nist_lmdb)["class_pixel_counts"]
    rare = int(min(counts, key=counts.get))
    pixels, centres = {}, {}
    for balance in (False, True):
        cfg = small_cfg(batch_size=8, balance_classes=balance)
        targets = torch.cat([b["target"] for b in first_batches(nist_lmdb, cfg, 20)])
        pixels[balance] = (targets == rare).float().mean().item()
        # without augmentation the patch centre is the drawn pixel: half are rare if balanced
        plain = replace(
            small_cfg(batch_size=16, balance_classes=balance), augment=AugmentConfig(enabled=False)
        )
        targets = torch.cat([b["target"] for b in first_batches(nist_lmdb, plain, 25)])
        centres[balance] = (targets[:, 32, 32] == rare).float().mean().item()
    assert pixels[True] > pixels[False] + 0.1, pixels  # measured 0.25 -> 0.42
    assert centres[False] < 0.35 and 0.4 < centres[True] < 0.6, centres


def raises_within(batches, seconds: float, match: str) -> None:
    """Draw batches until one raises; it must raise RuntimeError within ``seconds``."""
    start = time.perf_counter()
    with Deadline(int(seconds) + 20), pytest.raises(RuntimeError, match=match):
        for _ in range(1000):
            next(batches)
    assert time.perf_counter() - start < seconds


def test_killed_worker_raises_in_the_consumer(nist_lmdb):
    cfg = small_cfg(reader_count=2)
    with make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb)) as batches:
        next(batches)
        victim = batches.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        raises_within(batches, 10.0, match=f"{victim}.*exited unexpectedly")


def test_broken_batch_handover_names_the_dead_worker(nist_lmdb):
    # a worker killed mid-handover breaks the shared-memory fd transfer
    # (ConnectionResetError) before the DataLoader sees the death
    read_end, write_end = os.pipe()
    os.close(write_end)  # an exited process's sentinel: readable (EOF)

    class DeadWorker:
        pid = 4242
        sentinel = read_end

    class BrokenIterator:
        _workers = [DeadWorker()]

        def __next__(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    cfg = small_cfg(reader_count=0)
    with make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb)) as batches:
        batches._iterator = BrokenIterator()
        with pytest.raises(workers.ReaderError, match=r"pid\(s\) \[4242\]\) exited unexpectedly"):
            next(batches)
    os.close(read_end)


def test_hung_worker_is_killed_and_raises(nist_lmdb, monkeypatch):
    monkeypatch.setattr(workers, "WORKER_TIMEOUT_S", 1.0)
    cfg = small_cfg(reader_count=2)
    with make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb)) as batches:
        next(batches)
        victim = batches.worker_pids[1]
        os.kill(victim, signal.SIGSTOP)  # alive but makes no progress
        try:
            raises_within(batches, 12.0, match="exited unexpectedly")
        finally:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_error_in_a_worker_reaches_the_consumer(nist_lmdb, tmp_path):
    corrupt = tmp_path / "corrupt.lmdb"
    env, out = open_env(nist_lmdb), open_env(corrupt, write=True, map_size=1 << 28)
    with env.begin() as src, out.begin(write=True) as dst:
        for key, value in src.cursor():  # every record cut in half
            dst.put(key, value if key == METADATA_KEY else value[: len(value) // 2])
    env.close()
    out.close()
    assert read_metadata(corrupt)["num_samples"] == 20
    cfg = small_cfg(reader_count=1)
    with Deadline(30), pytest.raises(StoreError, match="damaged") as caught:
        first_batches(corrupt, cfg, 1)
    message = str(caught.value)  # one line naming the database, not the worker's traceback
    assert "\n" not in message and str(corrupt) in message and "ingest it again" in message


def test_instance_masks_give_semantic_and_boundary_targets_and_weights(bbbc_lmdb):
    semantic = first_batches(bbbc_lmdb, small_cfg(balance_classes=True), 2)
    assert set(torch.cat([b["target"] for b in semantic]).unique().tolist()) == {0, 1}
    boundary = first_batches(bbbc_lmdb, small_cfg(target="boundary", balance_classes=True), 2)
    assert set(torch.cat([b["target"] for b in boundary]).unique().tolist()) == {0, 1, 2}
    cfg = replace(small_cfg(), loss=LossConfig(border_weights=True))
    batch = first_batches(bbbc_lmdb, cfg, 1)[0]
    assert batch["weight"].shape == (4, 64, 64) and batch["weight"].dtype == torch.float32
    assert (batch["weight"] >= 1.0).all()


def test_border_weights_are_absent_for_class_masks(nist_lmdb, caplog):
    cfg = replace(small_cfg(), loss=LossConfig(border_weights=True))
    with caplog.at_level(logging.WARNING, logger="scarce.segment.readers"):
        batch = first_batches(nist_lmdb, cfg, 1)[0]
    assert "weight" not in batch and "needs instance masks" in caplog.text


def test_iter_test_images_covers_every_sample_in_key_order(nist_lmdb):
    cfg = small_cfg()
    seen = list(iter_test_images(nist_lmdb, spec_for(cfg, nist_lmdb)))
    with SampleStore(nist_lmdb) as store:
        assert [name for name, _, _ in seen] == [store[i].name for i in range(len(store))]
        for i, (_, image, target) in enumerate(seen):
            assert image.dtype == np.float32 and image.shape == store[i].image.shape
            assert target.dtype == np.int64 and np.array_equal(target, store[i].mask)
            assert abs(image.mean()) < 1e-3 and abs(image.std() - 1.0) < 1e-2  # z-scored
    again = list(iter_test_images(nist_lmdb, spec_for(cfg, nist_lmdb)))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(seen, again))


def test_starvation_monitor_logs_once_and_recovers(caplog):
    delays = [0.0, 0.0, 0.12, 0.12, 0.12, 0.0, 0.0, 0.0]

    def slow_then_fast():
        for i, delay in enumerate(delays):
            time.sleep(delay)
            yield i

    watch = StarvationMonitor(slow_then_fast(), threshold_ms=50.0)
    with caplog.at_level(logging.INFO, logger="scarce.data.monitor"):
        items = []
        for item in watch:
            time.sleep(0.02)  # the "training step"
            items.append(item)
    assert items == list(range(len(delays))) and watch.batches == len(delays)
    messages = [r.getMessage() for r in caplog.records]
    starving = [m for m in messages if m.startswith("Input queue starvation:")]
    assert len(starving) == 1, messages
    match = re.fullmatch(
        r"Input queue starvation: waited (\d+) ms for batch 2 \((\d+)% of step "
        r"time\)",
        starving[0],
    )
    assert match and 100 <= int(match[1]) < 400 and 50 <= int(match[2]) <= 95, starving[0]
    assert messages.count("Input queue starvation over") == 1
    fraction = watch.wait_fraction()
    assert 0.4 < fraction < 0.95, fraction  # 0.36 s of waiting in about 0.5 s
    assert watch.wait_fraction() < 0.05  # reset


def test_bad_arguments_are_refused_before_work(nist_lmdb, tmp_path):
    cfg = small_cfg()
    with pytest.raises(ValueError, match="start_batch"):
        make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb), start_batch=-1)
    with pytest.raises(StoreError, match="not an LMDB database"):
        make_train_loader(tmp_path, cfg, norm_spec={})
    with pytest.raises(ValueError, match="norm_spec"):
        make_train_loader(nist_lmdb, cfg, norm_spec=None)


@pytest.mark.parametrize(("cores", "auto"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)])
def test_reader_count_auto_is_half_the_usable_cores_in_1_to_8(monkeypatch, cores, auto):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert resolve_reader_count(-1) == auto
    assert [resolve_reader_count(n) for n in (0, 1, 3, 12)] == [0, 1, 3, 12]
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # e.g. macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 2 * cores)
    assert resolve_reader_count(-1) == max(1, min(8, cores))


def test_reader_count_auto_starts_workers_and_below_minus_one_is_refused(nist_lmdb, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cfg = small_cfg(reader_count=-1)
    with make_train_loader(nist_lmdb, cfg, norm_spec=spec_for(cfg, nist_lmdb)) as batches:
        assert batches.reader_count == 2 and len(batches.worker_pids) == 2
        assert same(next(batches), first_batches(nist_lmdb, small_cfg(), 1)[0])
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="reader_count must be an integer >= -1"):
            resolve_reader_count(bad)
    with pytest.raises(ValueError, match="reader_count"):
        make_train_loader(nist_lmdb, small_cfg(reader_count=-2), norm_spec=spec_for(cfg, nist_lmdb))


def test_benchmark_reports_rates(nist_lmdb):
    result = benchmark_readers(nist_lmdb.parent, small_cfg(), seconds=0.3, reader_count=0)
    assert result["batches"] >= 1 and result["patches_per_second"] > 0
    assert result["patches_per_second"] == pytest.approx(4 * result["batches_per_second"])
    assert "augmented patches/s" in format_benchmark(result)


def test_uniform_centres_keep_the_patch_inside_the_image():
    from scarce.segment.readers import _inside_centre

    rng = np.random.default_rng(0)
    for size, patch in ((256, 256), (300, 128), (520, 256), (40, 64), (129, 128)):
        centres = np.array([_inside_centre(size, patch, rng) for _ in range(2000)])
        start = centres - patch // 2
        if size >= patch:
            assert start.min() == 0 and (start + patch).max() == size  # both ends reached
            assert (start >= 0).all() and (start + patch <= size).all()
        else:
            assert (start <= 0).all() and (start + patch >= size).all()


def test_empty_fields_are_background_patches_normalised_on_their_own(bbbc_lmdb):
    """``augment.empty_field_p``: objects removed, target all background, the noise floor holds."""
    cfg = small_cfg(target="boundary", normalization="robust", patch_size=128, balance_classes=True)
    spec = normalization_spec_for(bbbc_lmdb, cfg)

    def batches(p: float) -> list[dict]:
        run = replace(cfg, augment=AugmentConfig(empty_field_p=p))
        with make_train_loader(bbbc_lmdb, run, norm_spec=spec) as it:
            return [next(it) for _ in range(3)]

    plain, emptied, mixed = batches(0.0), batches(1.0), batches(0.5)
    assert all(b["target"].any() for b in plain)  # class balancing puts nuclei in the patches
    for batch in emptied:
        assert not batch["target"].any()
        # a field of noise and debris, scaled by the floor: near 0 and nothing as bright as
        # a nucleus (about 1 after normalisation)
        for patch in batch["image"]:
            assert abs(patch.median().item()) < 0.1 and patch.quantile(0.99).item() < 0.5
    fg = [bool(t.any()) for b in mixed for t in b["target"]]
    assert 0 < sum(fg) < len(fg)
    off = replace(cfg, augment=AugmentConfig(enabled=False, empty_field_p=1.0))
    with make_train_loader(bbbc_lmdb, off, norm_spec=spec) as it:
        assert next(it)["target"].any()  # --no-augment turns empty fields off too
