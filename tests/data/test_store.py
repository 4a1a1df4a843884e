"""Tests of scarce.store: record round trip without copies, writer settings, metadata errors."""

import json

import numpy as np
import pytest

from scarce import store


def _write(path, samples, meta=None, **open_kw):
    env = store.open_env(path, write=True, **open_kw)
    with env.begin(write=True) as txn:
        for i, (image, mask) in enumerate(samples):
            record = store.encode_sample(f"s{i}", f"src{i}", (i, 2 * i), image, mask, [0, 1])
            txn.put(store.sample_key(i), record)
        meta = {"format_version": store.FORMAT_VERSION, "num_samples": len(samples)} | (meta or {})
        txn.put(store.METADATA_KEY, json.dumps(meta).encode())
    return env


@pytest.fixture
def samples():
    rng = np.random.default_rng(3)
    return [
        (
            rng.integers(0, 65535, (2, 31, 17), dtype=np.uint16),
            rng.integers(0, 5, (31, 17), dtype=np.uint8),
        ),
        (
            rng.random((3, 8, 40), dtype=np.float32),
            rng.integers(0, 70000, (8, 40)).astype(np.int32),
        ),
    ]


def test_encode_decode_round_trip_without_copy(samples):
    image, mask = samples[0]
    record = store.encode_sample("a@3,4", "a", (3, 4), image, mask, [0, 2, 4])
    sample = store.decode_sample(memoryview(record))
    assert (sample.name, sample.source, sample.origin, sample.classes) == (
        "a@3,4",
        "a",
        (3, 4),
        (0, 2, 4),
    )
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.mask, mask)
    assert sample.image.dtype == image.dtype and sample.mask.dtype == mask.dtype
    whole = np.frombuffer(record, np.uint8)
    assert np.shares_memory(sample.image, whole) and np.shares_memory(sample.mask, whole)
    assert not sample.image.flags.writeable


def test_encode_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"x: image \(1, 4, 4\) and mask \(4, 5\) do not match"):
        store.encode_sample("x", "x", (0, 0), np.zeros((1, 4, 4)), np.zeros((4, 5)), [0])


def test_sample_store_reads_back_copies(tmp_path, samples):
    _write(tmp_path / "db.lmdb", samples).close()
    with store.SampleStore(tmp_path / "db.lmdb") as db:
        assert len(db) == 2 and db.metadata["num_samples"] == 2
        for i, (image, mask) in enumerate(samples):
            sample = db[i]
            assert sample.origin == (i, 2 * i) and sample.image.flags.writeable
            np.testing.assert_array_equal(sample.image, image)
            np.testing.assert_array_equal(sample.mask, mask)
        assert store.decode_sample(db.read_raw(1)).name == "s1"
        with pytest.raises(IndexError, match="out of range 0..1"):
            db[2]


def test_writemap_writer_is_trimmed_and_readable(tmp_path, samples):
    env = _write(tmp_path / "db.lmdb", samples, map_size=64 << 20, writemap=True)
    assert (tmp_path / "db.lmdb" / "data.mdb").stat().st_size == 64 << 20  # sized to the map
    size = store.close_writer(env)
    assert (tmp_path / "db.lmdb" / "data.mdb").stat().st_size == size < 1 << 20
    with store.SampleStore(tmp_path / "db.lmdb") as db:
        np.testing.assert_array_equal(db[1].mask, samples[1][1])


def test_missing_and_foreign_databases(tmp_path, samples):
    with pytest.raises(store.StoreError, match="no data.mdb inside"):
        store.open_env(tmp_path / "nothing")
    env = store.open_env(tmp_path / "plain", write=True)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    with pytest.raises(store.StoreError, match="no metadata record"):
        store.read_metadata(tmp_path / "plain")
    _write(tmp_path / "new", samples, {"format_version": store.FORMAT_VERSION + 1}).close()
    with pytest.raises(store.StoreError, match="newer than this Scarce"):
        store.read_metadata(tmp_path / "new")
    with pytest.raises(store.StoreError, match="no train.lmdb/test.lmdb"):
        store.inspect_database(tmp_path)
