"""Tests of scarce.data.store: record round trip without copies, writer settings, metadata errors."""

import json
import struct

import numpy as np
import pytest

from scarce.data import install, store
from scarce.data.inspect import inspect_database
from scarce.errors import OutputExistsError


def _write(path, samples, meta=None, **open_kw):
    env = store.open_env(path, write=True, **open_kw)
    with env.begin(write=True) as txn:
        for i, (image, mask) in enumerate(samples):
            arrays = {"image": image, "mask": mask}
            record = store.encode_sample(f"s{i}", f"src{i}", (i, 2 * i), arrays, [0, 1])
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
    arrays = {"image": image, "mask": mask}
    record = store.encode_sample("a@3,4", "a", (3, 4), arrays, [0, 2, 4])
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
        arrays = {"image": np.zeros((1, 4, 4)), "mask": np.zeros((4, 5))}
        store.encode_sample("x", "x", (0, 0), arrays, [0])


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
        inspect_database(tmp_path)


def _v1_record(name, image, mask, classes) -> bytes:
    """A record in the format-1 layout (image and mask at the top of the header), byte for byte
    as Scarce 0.1 wrote it."""
    header = {
        "name": name,
        "source": name,
        "origin": [0, 0],
        "classes": classes,
        "image": {
            "shape": list(image.shape),
            "dtype": image.dtype.str,
            "offset": 0,
            "nbytes": image.nbytes,
        },
        "mask": {
            "shape": list(mask.shape),
            "dtype": mask.dtype.str,
            "offset": image.nbytes,
            "nbytes": mask.nbytes,
        },
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack("<I", len(head)), head, image.tobytes(), mask.tobytes()))


def test_format_1_records_still_decode(samples):
    image, mask = samples[1]
    sample = store.decode_sample(_v1_record("old", image, mask, [0, 7]))
    assert sample.name == "old" and sample.classes == (0, 7) and sample.info == {}
    assert set(sample.arrays) == {"image", "mask"}
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.mask, mask)


def test_named_arrays_any_number_and_info(samples):
    image, _ = samples[0]
    stack_slice = image[:1]
    field = np.arange(2 * 31 * 17, dtype=np.float32).reshape(2, 31, 17)
    arrays = {"image": stack_slice, "field": field}
    record = store.encode_sample("stack@4", "stack", (0, 0), arrays, info={"z": 4})
    sample = store.decode_sample(record)
    assert list(sample.arrays) == ["image", "field"] and sample.mask is None
    assert sample.info == {"z": 4}
    np.testing.assert_array_equal(sample.arrays["field"], field)
    np.testing.assert_array_equal(sample.image, stack_slice)


def test_install_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "db"
    with install.install_folder(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    with pytest.raises(OutputExistsError, match="exists"):
        with install.install_folder(out):
            pass
    with pytest.raises(RuntimeError, match="killed"):
        with install.install_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert (out / "a.txt").read_text() == "new"  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temporary left
    with pytest.raises(OutputExistsError, match="not a Scarce database folder"):
        with install.install_folder(out, overwrite=True, replaceable={"train.lmdb"}):
            pass
