"""Tests of scarce.data.ingest on real data subsets and on small bad files made here."""

import json
import shutil
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from scarce import io
from scarce.data import ingest as ingest_module
from scarce.data import store
from scarce.data.ingest import ingest
from scarce.data.inspect import format_inspection, inspect_database
from scarce.data.records import tile_origins
from scarce.data.split import split_stems
from scarce.errors import IngestError
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def _dataset(name: str) -> Path:
    if not (DATA / name / "images").is_dir():
        pytest.skip(f"real dataset {name} not found at {DATA / name}")
    return DATA / name


def _subset(tmp_path: Path, name: str, stems: list[str]) -> tuple[Path, Path]:
    """Symlink some pairs of a real dataset into tmp_path/{images,masks}."""
    src = _dataset(name)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for path in io.list_image_files(src / folder):
            if path.stem in stems:
                (tmp_path / folder / path.name).symlink_to(path)
    return tmp_path / "images", tmp_path / "masks"


def _dsb_stems() -> list[str]:
    """Three dsb2018 images: two grayscale of different sizes and one RGB."""
    rows = (_dataset("dsb2018") / "metadata.csv").read_text().splitlines()[1:]
    meta = [r.split(",") for r in rows]
    wanted = [
        ("fluorescence", "256", "256"),
        ("fluorescence", "520", "696"),
        ("histology_stained", "256", "320"),
    ]
    return [next(r[0] for r in meta if (r[1], r[2], r[3]) == w) for w in wanted]


def _all_samples(db: Path) -> list[store.Sample]:
    with store.SampleStore(db) as s:
        return [s[i] for i in range(len(s))]


def _assert_round_trip(out: Path, images: Path, masks: Path, channels: int) -> int:
    """Every stored pixel and label equals the source files; return the sample count."""
    files = {p.stem: p for p in io.list_image_files(images)}
    mask_files = {p.stem: p for p in io.list_image_files(masks)}
    count = 0
    for split in ("train", "test"):
        if not (out / f"{split}.lmdb").exists():
            continue
        meta = store.read_metadata(out / f"{split}.lmdb")
        for entry, sample in zip(meta["samples"], _all_samples(out / f"{split}.lmdb")):
            image = io.read_image(files[sample.source])
            mask = io.read_mask(mask_files[sample.source])
            (y, x), (h, w) = sample.origin, sample.mask.shape
            expected = np.broadcast_to(image, (channels, *image.shape[1:]))[:, y : y + h, x : x + w]
            np.testing.assert_array_equal(sample.image, expected)
            np.testing.assert_array_equal(sample.mask, mask[y : y + h, x : x + w])
            assert list(sample.classes) == entry["classes"]
            assert (entry["name"], entry["origin"], entry["shape"]) == (sample.name, [y, x], [h, w])
            count += 1
    return count


def test_round_trip_nist_rpe_class_masks(tmp_path):
    stems = [p.stem for p in io.list_image_files(_dataset("nist_rpe") / "images")[:5]]
    images, masks = _subset(tmp_path, "nist_rpe", stems)
    summary = ingest(images, masks, tmp_path / "db", progress=False)
    assert (summary["train"], summary["test"]) == (4, 1)
    assert _assert_round_trip(tmp_path / "db", images, masks, channels=1) == 5
    split = json.loads((tmp_path / "db" / "split.json").read_text())
    assert sorted(split["train"] + split["test"]) == sorted(stems)
    meta = store.read_metadata(tmp_path / "db" / "train.lmdb")
    assert (meta["image_dtype"], meta["mask_dtype"], meta["mask_kind"]) == (
        "uint16",
        "uint8",
        "class",
    )
    assert meta["sources"] == split["train"] and meta["class_ids"] == [0, 1]
    pixels = sum(int(v) for v in meta["class_pixel_counts"].values())
    assert pixels == 4 * 256 * 256
    stacked = np.stack([s.image for s in _all_samples(tmp_path / "db" / "train.lmdb")])
    np.testing.assert_allclose(meta["intensity"]["mean"], [stacked.mean()])
    np.testing.assert_allclose(meta["intensity"]["std"], [stacked.std()])
    np.testing.assert_allclose(meta["intensity"]["p99"], [np.percentile(stacked, 99)])
    info = inspect_database(tmp_path / "db")
    assert info["databases"]["train"]["num_samples"] == 4
    assert info["databases"]["test"]["records_match"]
    assert "samples: 4 from 4 source image(s)" in format_inspection(info)


def test_round_trip_dsb2018_mixed_sizes_rgb_and_gray(tmp_path):
    stems = _dsb_stems()
    images, masks = _subset(tmp_path, "dsb2018", stems)
    summary = ingest(images, masks, tmp_path / "db", mask_kind="instance", progress=False)
    assert summary["channels"] == 3 and summary["train"] + summary["test"] == 3
    assert _assert_round_trip(tmp_path / "db", images, masks, channels=3) == 3
    metas = [store.read_metadata(tmp_path / "db" / f"{s}.lmdb") for s in ("train", "test")]
    assert sorted(sum((m["channel_expanded"] for m in metas), [])) == sorted(stems[:2])
    instances = sum(len(np.unique(io.read_mask(p))) - 1 for p in io.list_image_files(masks))
    assert sum(m["num_instances"] for m in metas) == instances
    assert all(m["mask_dtype"] == "uint16" and m["class_ids"] == [0, 1] for m in metas)
    files = {p.stem: p for p in io.list_image_files(images)}
    for meta in metas:  # statistics of the stored (gray -> RGB) pixels, per channel
        stored = [io.read_image(files[s]) for s in meta["sources"]]
        pixels = np.concatenate(
            [np.broadcast_to(a, (3, *a.shape[1:])).reshape(3, -1) for a in stored], axis=1
        )
        np.testing.assert_allclose(meta["intensity"]["mean"], pixels.mean(axis=1))
        np.testing.assert_allclose(meta["intensity"]["p1"], np.percentile(pixels, 1, axis=1))


def test_files_beyond_the_cache_are_decoded_again(tmp_path, monkeypatch):
    stems = [p.stem for p in io.list_image_files(_dataset("nist_rpe") / "images")[:4]]
    images, masks = _subset(tmp_path, "nist_rpe", stems)
    ingest(images, masks, tmp_path / "cached", tile_size=128, workers=1, progress=False)
    monkeypatch.setattr(ingest_module, "CACHE_BYTES", 256 * 256 * 3)  # room for one pair
    ingest(images, masks, tmp_path / "db", tile_size=128, workers=3, progress=False)
    assert _assert_round_trip(tmp_path / "db", images, masks, channels=1) == 16
    for split in ("train", "test"):  # same records whatever the threads and the cache did
        with (
            store.SampleStore(tmp_path / "cached" / f"{split}.lmdb") as a,
            store.SampleStore(tmp_path / "db" / f"{split}.lmdb") as b,
        ):
            assert [a.read_raw(i) for i in range(len(a))] == [b.read_raw(i) for i in range(len(b))]


def test_instance_masks_stored_exactly_bbbc039(tmp_path):
    stems = [p.stem for p in io.list_image_files(_dataset("bbbc039") / "masks")[:2]]
    images, masks = _subset(tmp_path, "bbbc039", stems)
    ingest(images, masks, tmp_path / "db", mask_kind="instance", train_fraction=1.0, progress=False)
    assert not (tmp_path / "db" / "test.lmdb").exists()
    for sample in _all_samples(tmp_path / "db" / "train.lmdb"):
        source = io.read_mask(masks / f"{sample.source}.png")
        assert sample.mask.dtype == np.uint16
        np.testing.assert_array_equal(sample.mask, source)  # never relabelled
        assert sample.classes == ((0, 1) if source.any() else (0,))


def _float_images(root: Path) -> np.ndarray:
    """Three 2-channel float32 TIFFs of different sizes; returns all pixels ``(2, N)``."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(5)
    pixels = []
    for i, (h, w) in enumerate([(20, 30), (25, 25), (10, 40)]):
        image = rng.random((2, h, w), dtype=np.float32) * [[[1.0]], [[100.0]]]
        tifffile.imwrite(
            root / "images" / f"f{i}.tif", image.astype(np.float32), photometric="minisblack"
        )
        tifffile.imwrite(root / "masks" / f"f{i}.tif", (image[0] > 0.5).astype(np.uint8))
        pixels.append(image.astype(np.float32).reshape(2, -1))
    return np.concatenate(pixels, axis=1).astype(np.float64)


def test_float_intensity_statistics_exact_and_subsampled(tmp_path, monkeypatch):
    pixels = _float_images(tmp_path)
    args = (tmp_path / "images", tmp_path / "masks")
    ingest(*args, tmp_path / "a", train_fraction=1.0, progress=False)
    exact = store.read_metadata(tmp_path / "a" / "train.lmdb")["intensity"]
    np.testing.assert_allclose(exact["mean"], pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(exact["std"], pixels.std(axis=1), rtol=1e-9)
    np.testing.assert_allclose(exact["p99"], np.percentile(pixels, 99, axis=1), rtol=1e-12)
    monkeypatch.setattr(ingest_module, "PERCENTILE_PIXELS", 1000)  # 1000 of 2250 pixels
    estimates = []
    for out in ("b", "c"):
        ingest(*args, tmp_path / out, train_fraction=1.0, seed=4, progress=False)
        estimates.append(store.read_metadata(tmp_path / out / "train.lmdb")["intensity"])
    assert estimates[0] == estimates[1]  # seeded subsample: reproducible
    np.testing.assert_allclose(estimates[0]["mean"], exact["mean"], rtol=1e-12)  # still exact
    scale = np.array([1.0, 100.0])  # channel ranges
    for q in ("p1", "p99"):
        assert estimates[0][q] != exact[q]
        np.testing.assert_allclose(
            np.divide(estimates[0][q], scale), np.divide(exact[q], scale), atol=0.03
        )


def test_tile_origins_edges_shift_inside():
    assert tile_origins(10, 10, 4) == ([(y, x) for y in (0, 4, 6) for x in (0, 4, 6)], (4, 4))
    assert tile_origins(10, 3, 4, 3)[0] == [(0, 0), (3, 0), (6, 0)]
    assert tile_origins(3, 3, 4) == ([(0, 0)], (3, 3))  # smaller than a tile: kept whole
    assert tile_origins(7, 9, None) == ([(0, 0)], (7, 9))
    with pytest.raises(ValueError, match="stride skips pixels"):
        tile_origins(10, 10, 4, 5)


def test_tiling_covers_every_pixel_and_keeps_sources_in_one_split(tmp_path):
    stems = ["00", "01", "02", "03"]
    images, masks = _subset(tmp_path, "isbi2012", stems)
    ingest(images, masks, tmp_path / "db", tile_size=200, tile_stride=150, progress=False)
    assert _assert_round_trip(tmp_path / "db", images, masks, channels=1) == 4 * 16
    seen = {}
    for split in ("train", "test"):
        meta = store.read_metadata(tmp_path / "db" / f"{split}.lmdb")
        assert meta["tiling"] == {"tile_size": 200, "tile_stride": 150}
        covered = {}
        for entry in meta["samples"]:
            assert seen.setdefault(entry["source"], split) == split
            grid = covered.setdefault(entry["source"], np.zeros((512, 512), bool))
            (y, x), (h, w) = entry["origin"], entry["shape"]
            assert (h, w) == (200, 200) and y + h <= 512 and x + w <= 512
            grid[y : y + h, x : x + w] = True
        assert all(grid.all() for grid in covered.values())
    assert sorted(seen) == stems


def test_images_smaller_than_a_tile_kept_whole(tmp_path):
    images, masks = _subset(tmp_path, "dsb2018", _dsb_stems())
    ingest(
        images,
        masks,
        tmp_path / "db",
        tile_size=300,
        mask_kind="instance",
        train_fraction=1.0,
        progress=False,
    )
    entries = store.read_metadata(tmp_path / "db" / "train.lmdb")["samples"]
    shapes = sorted((tuple(e["shape"]), tuple(e["origin"])) for e in entries)
    assert ((256, 256), (0, 0)) in shapes  # whole image
    assert [s for s in shapes if s[0] == (256, 300)] == [
        ((256, 300), (0, 0)),
        ((256, 300), (0, 20)),
    ]


def test_split_rule_small_datasets_and_reproducibility():
    stems = [f"s{i:02d}" for i in range(20)]
    a, b = split_stems(stems, 0.8, seed=1), split_stems(stems[::-1], 0.8, seed=1)
    assert a == b and len(a["test"]) == 4 and not set(a["train"]) & set(a["test"])
    assert split_stems(stems, 0.8, seed=2) != a
    assert split_stems(["a"], 0.5) == {"train": ["a"], "test": []}
    assert [len(split_stems(stems[:n], 0.8)["test"]) for n in (2, 3, 4, 5)] == [1, 1, 1, 1]
    assert len(split_stems(stems[:2], 0.01)["train"]) == 1  # at least one train image
    assert split_stems(stems, 1.0)["test"] == []
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\]"):
        split_stems(stems, 0.0)


def test_split_reuse_and_given_split_errors(tmp_path):
    stems = [p.stem for p in io.list_image_files(_dataset("nist_rpe") / "images")[:4]]
    images, masks = _subset(tmp_path, "nist_rpe", stems)
    ingest(images, masks, tmp_path / "a", seed=5, progress=False)
    ingest(
        images, masks, tmp_path / "b", split=tmp_path / "a" / "split.json", seed=9, progress=False
    )
    assert (tmp_path / "a" / "split.json").read_text() == (
        tmp_path / "b" / "split.json"
    ).read_text()
    bad = {"train": stems[:2] + ["ghost"], "test": [stems[2]]}
    with pytest.raises(IngestError) as err:
        ingest(images, masks, tmp_path / "c", split=bad, progress=False)
    assert "ghost" in str(err.value) and f"image(s) not in the split: {stems[3]}" in str(err.value)
    assert not (tmp_path / "c").exists()


def test_single_image_goes_to_train_without_test_db(tmp_path, caplog):
    images, masks = _subset(tmp_path, "nist_rpe", ["img_000580"])
    summary = ingest(images, masks, tmp_path / "db", progress=False)
    assert (summary["train"], summary["test"]) == (1, 0)
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["split.json", "train.lmdb"]
    assert "test split is empty" in caplog.text


def _bad_inputs(root: Path) -> dict[str, str]:
    """Write one problem per file; return file name -> text expected in its problem line."""
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (16, 20), dtype=np.uint8)
    labels = rng.integers(0, 3, (16, 20), dtype=np.uint8)
    for stem in (
        "ok1",
        "ok2",
        "ok3",
        "size",
        "float",
        "rgb",
        "neg",
        "i64",
        "trunc",
        "nan",
        "ch2",
        "ch3",
        "jpgmask",
    ):
        iio.imwrite(images / f"{stem}.png", gray)
        if stem != "jpgmask":
            iio.imwrite(masks / f"{stem}.png", labels)
    iio.imwrite(images / "nomask.png", gray)
    iio.imwrite(masks / "noimage.png", labels)
    iio.imwrite(masks / "size.png", labels[:10])
    tifffile.imwrite(masks / "float.tif", labels + 0.5)
    (masks / "float.png").unlink()
    iio.imwrite(masks / "rgb.png", np.stack([labels] * 3, -1))
    tifffile.imwrite(masks / "neg.tif", labels.astype(np.int16) - 1)
    (masks / "neg.png").unlink()
    tifffile.imwrite(images / "i64.tif", gray.astype(np.int64))
    (images / "i64.png").unlink()
    data = (images / "trunc.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    tifffile.imwrite(images / "nan.tif", np.where(gray > 100, np.nan, 1.0).astype(np.float32))
    (images / "nan.png").unlink()
    tifffile.imwrite(images / "ch2.tif", np.stack([gray] * 2, -1), photometric="minisblack")
    (images / "ch2.png").unlink()
    iio.imwrite(images / "ch3.png", np.stack([gray] * 3, -1))
    iio.imwrite(masks / "jpgmask.jpg", labels * 100)
    (images / "dataset.yaml").write_text("class_names: [bg, fg, other]\ncolour: red\n")
    return {
        "nomask.png": "no mask with stem",
        "noimage.png": "no image with stem",
        "size.png": "mask is 10x20 (HxW) but image size.png is 16x20",
        "float.tif": "non-integral",
        "rgb.png": "single-channel",
        "neg.tif": "negative labels",
        "i64.tif": "unsupported image dtype int64",
        "trunc.png": "unreadable or truncated",
        "nan.tif": "NaN/inf",
        "ch2.tif": "has channel count 2",
        "ch3.png": "has channel count 3",
        "jpgmask.jpg": "JPEG masks are refused",
        "dataset.yaml": "unknown key 'colour'",
    }


def test_bad_inputs_all_reported_together_nothing_written(tmp_path):
    expected = _bad_inputs(tmp_path)
    with pytest.raises(IngestError) as err:
        ingest(tmp_path / "images", tmp_path / "masks", tmp_path / "out" / "db", progress=False)
    problems = err.value.problems
    assert len(problems) == len(expected), "\n".join(problems)
    for name, text in expected.items():
        assert any(name in p and text in p for p in problems), (name, text, problems)
    assert not (tmp_path / "out").exists()


def test_empty_folders_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(IngestError) as err:
        ingest(tmp_path / "images", tmp_path / "masks", tmp_path / "db", progress=False)
    assert [p.split(":")[0] for p in err.value.problems] == [
        str(tmp_path / "images"),
        str(tmp_path / "masks"),
    ]
    assert all("no image files" in p or "no mask files" in p for p in err.value.problems)
    assert not (tmp_path / "db").exists()


def test_multichannel_tiff_axes_and_dataset_yaml(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    arrays = {f"im{i}": rng.integers(0, 4000, (4, 24, 30), dtype=np.uint16) for i in range(3)}
    for i, (stem, array) in enumerate(arrays.items()):
        stored = array if i % 2 else array.transpose(1, 2, 0)  # (C, H, W) and (H, W, C) files
        tifffile.imwrite(images / f"{stem}.tif", stored, photometric="minisblack")
        tifffile.imwrite(masks / f"{stem}.tif", (array[0] > 2000).astype(np.uint8))
    (images / "dataset.yaml").write_text(
        "class_names: [background, cell]\nchannel_names: [dapi, gfp, rfp, bf]\n"
        "pixel_size_um: 0.65\ndescription: test set\nmask_kind: instance\n"
    )
    ingest(images, masks, tmp_path / "db", train_fraction=1.0, progress=False)
    for sample in _all_samples(tmp_path / "db" / "train.lmdb"):
        np.testing.assert_array_equal(sample.image, arrays[sample.source])
    meta = store.read_metadata(tmp_path / "db" / "train.lmdb")
    assert meta["channel_names"] == ["dapi", "gfp", "rfp", "bf"] and meta["pixel_size_um"] == 0.65
    assert meta["class_names"] == ["background", "cell"] and meta["description"] == "test set"
    assert meta["mask_kind"] == "instance"  # from dataset.yaml: no mask_kind argument given
    (images / "dataset.yaml").write_text("class_names: [background]\nchannel_names: [a]\n")
    with pytest.raises(IngestError) as err:
        ingest(images, masks, tmp_path / "db2", progress=False)
    assert len(err.value.problems) == 2 and all("dataset.yaml" in p for p in err.value.problems)


def test_overwrite_semantics(tmp_path):
    stems = [p.stem for p in io.list_image_files(_dataset("nist_rpe") / "images")[:4]]
    images, masks = _subset(tmp_path, "nist_rpe", stems)
    ingest(images, masks, tmp_path / "db", seed=0, progress=False)
    first = (tmp_path / "db" / "split.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        ingest(images, masks, tmp_path / "db", progress=False)
    ingest(images, masks, tmp_path / "db", train_fraction=0.5, overwrite=True, progress=False)
    second = json.loads((tmp_path / "db" / "split.json").read_text())
    assert len(second["test"]) == 2 and (tmp_path / "db" / "split.json").read_text() != first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.docx").write_text("precious")
    with pytest.raises(FileExistsError, match="not a Scarce database folder"):
        ingest(images, masks, tmp_path / "other", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "images", "masks", "other"]


def test_interrupted_ingest_keeps_old_database(tmp_path, monkeypatch):
    stems = [p.stem for p in io.list_image_files(_dataset("nist_rpe") / "images")[:5]]
    images, masks = _subset(tmp_path, "nist_rpe", stems)
    ingest(images, masks, tmp_path / "db", progress=False)
    before = inspect_database(tmp_path / "db")
    calls = []
    encode = store.encode_sample

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(store, "encode_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(images, masks, tmp_path / "db", seed=3, overwrite=True, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "images", "masks"]  # no temp
    after = inspect_database(tmp_path / "db")
    assert after["split"] == before["split"]
    assert after["databases"]["train"]["created"] == before["databases"]["train"]["created"]
    assert _assert_round_trip(tmp_path / "db", images, masks, channels=1) == 5


@pytest.mark.slow
def test_ingest_all_four_datasets(tmp_path):
    expected = {  # name: (kind, train, test, instances or class fractions from the READMEs)
        "nist_rpe": ("class", 80, 20, {"0": 0.713, "1": 0.287}),
        "isbi2012": ("class", 24, 6, {"0": 0.2196, "1": 0.7804}),
        "bbbc039": ("instance", 80, 20, 12003),
        "dsb2018": ("instance", 530, 133, 28803),  # 663 images: one withheld
    }
    for name, (kind, train, test, facts) in expected.items():
        src = _dataset(name)
        start = time.perf_counter()
        ingest(src / "images", src / "masks", tmp_path / name, mask_kind=kind, progress=False)
        info = inspect_database(tmp_path / name)["databases"]
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        assert (info["train"]["num_samples"], info["test"]["num_samples"]) == (train, test)
        assert all(d["records_match"] for d in info.values())
        if kind == "instance":
            assert info["train"]["num_instances"] + info["test"]["num_instances"] == facts
        else:
            counts = [
                {k: int(v) for k, v in d["class_pixel_counts"].items()} for d in info.values()
            ]
            total = {k: counts[0].get(k, 0) + counts[1].get(k, 0) for k in facts}
            for k, fraction in facts.items():
                assert total[k] / sum(total.values()) == pytest.approx(fraction, abs=1e-3)
        shutil.rmtree(tmp_path / name)


def _pairs(root: Path, masks: list[np.ndarray], images: list[np.ndarray] | None = None):
    """``root/images`` and ``root/masks`` holding these arrays as img{i}.tif."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        image = images[i] if images else np.full(mask.shape, 7 * i + 1, np.uint8)
        tifffile.imwrite(root / "images" / f"img{i}.tif", image)
        tifffile.imwrite(root / "masks" / f"img{i}.tif", mask)
    return root / "images", root / "masks"


def test_fiji_0_255_masks_become_binary_with_a_notice(tmp_path, caplog):
    fiji = np.zeros((24, 24), np.uint8)
    fiji[4:12, 4:12] = 255
    images, masks = _pairs(tmp_path, [fiji, fiji[::-1], np.zeros_like(fiji)])
    with caplog.at_level("WARNING"):
        ingest(images, masks, tmp_path / "db", train_fraction=1.0, progress=False)
    assert "Fiji/ImageJ binary mask" in caplog.text and "ignore_label: 255" in caplog.text
    meta = store.read_metadata(tmp_path / "db" / "train.lmdb")
    assert meta["class_ids"] == [0, 1] and meta["label_map"] == {"255": 1}
    assert meta["class_pixel_counts"] == {"0": 3 * 576 - 128, "1": 128}
    stored = {int(v) for s in _all_samples(tmp_path / "db" / "train.lmdb") for v in s.mask.flat}
    assert stored == {0, 1}


def test_255_as_the_ignore_label_is_not_remapped(tmp_path):
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 4:12] = 255
    mask[0, 0] = 1
    images, masks = _pairs(tmp_path, [mask, mask])
    (images / "dataset.yaml").write_text("ignore_label: 255\n")
    ingest(images, masks, tmp_path / "db", train_fraction=1.0, progress=False)
    meta = store.read_metadata(tmp_path / "db" / "train.lmdb")
    assert meta["label_map"] is None and meta["class_ids"] == [0, 1, 255]


def test_a_confirmed_class_count_allows_ids_above_255(tmp_path):
    mask = np.zeros((24, 24), np.uint16)
    mask[2:6, 2:6] = 300
    images, masks = _pairs(tmp_path, [mask, mask])
    with pytest.raises(IngestError, match="class id 300 in a class mask.*--num-classes N"):
        ingest(images, masks, tmp_path / "db", train_fraction=1.0, progress=False)
    assert not (tmp_path / "db").exists()
    ingest(images, masks, tmp_path / "db", train_fraction=1.0, progress=False, num_classes=301)
    meta = store.read_metadata(tmp_path / "db" / "train.lmdb")
    assert meta["class_ids"] == [0, 300] and meta["mask_dtype"] == "uint16"


def test_grayscale_is_repeated_into_rgb_but_not_into_two_channels(tmp_path):
    gray = np.full((24, 24), 9, np.uint8)
    mask = np.zeros((24, 24), np.uint8)
    rgb = np.stack([gray, gray + 1, gray + 2], -1)
    images, masks = _pairs(tmp_path / "rgb", [mask, mask], [gray, rgb])
    ingest(images, masks, tmp_path / "rgb" / "db", train_fraction=1.0, progress=False)
    meta = store.read_metadata(tmp_path / "rgb" / "db" / "train.lmdb")
    assert meta["channels"] == 3 and meta["channel_expanded"] == ["img0"]
    two = np.stack([gray, gray], -1)
    images, masks = _pairs(tmp_path / "two", [mask, mask], [gray, two])
    with pytest.raises(IngestError) as caught:
        ingest(images, masks, tmp_path / "two" / "db", train_fraction=1.0, progress=False)
    (line,) = caught.value.problems
    assert str(images / "img0.tif") in line and str(images / "img1.tif") in line
    assert "not into 2 separate channels" in line
