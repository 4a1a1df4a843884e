"""Benchmark: ``scarce ingest`` speed on dsb2018 against raw LMDB write speed of the same bytes.

Run from the repository root (about a minute on 2 CPU cores)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ingest.py

Measurements, each repeated ``--repeats`` times in turn after one untimed warm-up ingest
(so every run reads the source files from the page cache), median reported:

- **ingest**: :func:`scarce.data.ingest.ingest` of all of ``../shared/data/dsb2018`` with
  ``mask_kind="instance"`` into a temporary folder: pairing, decoding and validating every
  file, splitting, statistics, writing both databases (fsync'd) and the atomic rename;
- **ingest, two passes**: the same with the decoded-array cache off
  (``scarce.data.ingest.CACHE_BYTES = 0``): files are decoded again for writing, which is what
  happens to datasets whose decoded size exceeds the cache;
- **raw LMDB write**: the very samples ingest stored (read back beforehand, so the same bytes
  and shapes), encoded with :func:`scarce.data.store.encode_sample` and written with the same writer
  settings (``writemap``, 64 MB transactions, fsync and trim at the end), with no decoding,
  validation or statistics;
- **decoding alone** of every file on one thread, and the CPU seconds of each step of ingest
  (decode image, decode mask, label counts, statistics, tile/encode, LMDB write) run on one
  thread one file at a time, to show where ingest's time goes.

Throughput is image + mask bytes written (as stored, i.e. grayscale repeated to RGB) divided
by wall time, MB/s (10^6 bytes). The figure of merit is ingest MB/s / raw MB/s (target >= 0.5).
Results go to ``benchmarks/results/ingest.json`` and ``benchmarks/results/ingest.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scarce import io
from scarce.data import ingest as ingest_module
from scarce.data import records as ingest_records
from scarce.data import store
from scarce.data.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def raw_write(samples: list[store.Sample], db: Path) -> tuple[float, float]:
    """Write pre-decoded samples as ingest does, without checks; return (wall, CPU) seconds."""
    pixel_bytes = sum(s.image.nbytes + s.mask.nbytes for s in samples)
    start, cpu = time.perf_counter(), time.process_time()
    env = store.open_env(
        db,
        write=True,
        writemap=True,
        map_size=int(pixel_bytes * 1.1) + len(samples) * 8192 + (64 << 20),
    )
    txn, pending = env.begin(write=True), 0
    for i, s in enumerate(samples):
        record = store.encode_sample(s.name, s.source, s.origin, s.arrays, list(s.classes))
        txn.put(store.sample_key(i), record, append=True)
        pending += len(record)
        if pending >= ingest_module.COMMIT_BYTES:
            txn.commit()
            txn, pending = env.begin(write=True), 0
    txn.put(store.METADATA_KEY, json.dumps({"num_samples": len(samples)}).encode())
    txn.commit()
    store.close_writer(env)
    return time.perf_counter() - start, time.process_time() - cpu


def timed_ingest(data: Path, out: Path, cache_bytes: int) -> tuple[tuple[float, float], dict]:
    """One ingest with the given decoded-array cache size; return ((wall, CPU) s, summary).

    CPU seconds are those of the whole process (all decoder threads).
    """
    saved = ingest_module.CACHE_BYTES
    ingest_module.CACHE_BYTES = cache_bytes
    try:
        start, cpu = time.perf_counter(), time.process_time()
        summary = ingest(
            data / "images",
            data / "masks",
            out,
            mask_kind="instance",
            overwrite=True,
            progress=False,
        )
        return (time.perf_counter() - start, time.process_time() - cpu), summary
    finally:
        ingest_module.CACHE_BYTES = saved


def decode_only(data: Path) -> tuple[float, float]:
    """Decode every image and mask once on one thread (no checks); return (wall, CPU) s."""
    pairs, _ = ingest_module.pair_files(data / "images", data / "masks")
    start, cpu = time.perf_counter(), time.process_time()
    for _, image, mask in pairs:
        io.read_image(image), io.read_mask(mask)
    return time.perf_counter() - start, time.process_time() - cpu


def phases(data: Path, summary: dict, db: Path) -> dict[str, float]:
    """CPU seconds of each step of ingest, on one thread, one file at a time (no overlap).

    The steps of :func:`scarce.data.ingest.ingest` for every pair: decode the image, decode the
    mask, count labels (the per-file part of validation), fold in the intensity statistics,
    tile and encode the records (gray -> RGB included), put them into LMDB (writemap, 64 MB
    transactions, fsync and trim at the end).
    """
    pairs, _ = ingest_module.pair_files(data / "images", data / "masks")
    plan = ingest_module.StoragePlan(
        summary["mask_kind"],
        summary["channels"],
        np.dtype(summary["image_dtype"]),
        np.dtype(summary["mask_dtype"]),
    )
    stats = ingest_records.IntensityStats(
        plan.channels, plan.image_dtype, 1, np.random.default_rng(0)
    )
    env = store.open_env(
        db, write=True, writemap=True, map_size=int(summary["raw_bytes"] * 1.1) + (256 << 20)
    )
    spent = dict.fromkeys(
        ["decode_image", "decode_mask", "label_counts", "statistics", "tile_encode", "lmdb_write"],
        0.0,
    )
    txn, pending, index = env.begin(write=True), 0, 0

    def timed(step, function, *args):
        start = time.process_time()
        result = function(*args)
        spent[step] += time.process_time() - start
        return result

    for stem, image_path, mask_path in pairs:
        image = timed("decode_image", io.read_image, image_path).astype(plan.image_dtype)
        mask = timed("decode_mask", io.read_mask, mask_path).astype(plan.mask_dtype)
        labels, counts = timed("label_counts", ingest_records.label_counts, mask)
        timed("statistics", stats.add, image)
        source = ingest_module.Source(
            stem,
            image_path,
            mask_path,
            mask.shape,
            len(image),
            image.dtype,
            mask.dtype,
            labels,
            counts,
        )
        samples = timed(
            "tile_encode", ingest_module.encode_source, source, image, mask, plan, (None, None)
        )
        start = time.process_time()
        for _, record in samples:
            txn.put(store.sample_key(index), record, append=True)
            index, pending = index + 1, pending + len(record)
            if pending >= ingest_module.COMMIT_BYTES:
                txn.commit()
                txn, pending = env.begin(write=True), 0
        spent["lmdb_write"] += time.process_time() - start
    start = time.process_time()
    txn.commit()
    store.close_writer(env)
    spent["lmdb_write"] += time.process_time() - start
    return spent


def machine() -> dict:
    """Where the numbers were taken."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def run(data: Path, repeats: int, tmp_root: str | None) -> dict:
    """All measurements; returns the result record."""
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        tmp = Path(tmp)
        _, summary = timed_ingest(data, tmp / "db", ingest_module.CACHE_BYTES)  # warm-up
        samples = []
        for split in ("train", "test"):
            with store.SampleStore(tmp / "db" / f"{split}.lmdb") as db:
                samples += [db[i] for i in range(len(db))]
        raw_bytes = summary["raw_bytes"]
        assert raw_bytes == sum(s.image.nbytes + s.mask.nbytes for s in samples)
        runs: dict[str, list] = {
            "ingest": [],
            "ingest_two_pass": [],
            "raw_lmdb": [],
            "decode_only": [],
        }
        for i in range(repeats):
            runs["decode_only"].append(decode_only(data))
            runs["ingest"].append(timed_ingest(data, tmp / "db", ingest_module.CACHE_BYTES)[0])
            runs["ingest_two_pass"].append(timed_ingest(data, tmp / "db", 0)[0])
            runs["raw_lmdb"].append(raw_write(samples, tmp / f"raw{i}"))
        del samples
        steps = phases(data, summary, tmp / "phases")
    times = {k: [wall for wall, _ in v] for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: raw_bytes / 1e6 / t for k, t in median.items()}
    return {
        "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ingest.py "
        + shlex.join(sys.argv[1:]),
        "dataset": str(data),
        "files": 2 * (summary["train_sources"] + summary["test_sources"]),
        "samples": summary["train"] + summary["test"],
        "raw_bytes": raw_bytes,
        "repeats": repeats,
        "seconds": times,
        "median_seconds": median,
        "mb_per_s": mbps,
        "median_cpu_seconds": cpu,
        "ratio_ingest_to_raw": mbps["ingest"] / mbps["raw_lmdb"],
        "ratio_two_pass_to_raw": mbps["ingest_two_pass"] / mbps["raw_lmdb"],
        "cpu_ratio_raw_to_ingest": cpu["raw_lmdb"] / cpu["ingest"],
        "phase_cpu_seconds": steps,
        "machine": {
            **machine(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def markdown(result: dict) -> str:
    """The markdown report."""
    m, mb, cpu = result["machine"], result["mb_per_s"], result["median_cpu_seconds"]
    rows = [
        ("ingest (validate + write, decoded arrays cached)", "ingest"),
        ("ingest, two passes (decode again to write)", "ingest_two_pass"),
        ("raw LMDB write of the same records", "raw_lmdb"),
        ("decoding alone, one thread (no checks, no writing)", "decode_only"),
    ]
    table = "\n".join(
        f"| {label} | {result['median_seconds'][k]:.2f} | {mb[k]:.0f} | "
        f"{result['median_cpu_seconds'][k]:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in result['seconds'][k])} |"
        for label, k in rows
    )
    step = result["phase_cpu_seconds"]
    total = sum(step.values())
    steps = "\n".join(f"| {k} | {v:.2f} | {100 * v / total:.0f} % |" for k, v in step.items())
    n = m["nproc"]
    ideal = (step["decode_image"] + step["decode_mask"] + step["label_counts"]) / n + max(
        step["statistics"] + step["lmdb_write"], step["tile_encode"] / n
    )
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in m["load_average_at_end"])
    return f"""# Ingest benchmark: dsb2018

Command (from the repository root): `{result["command"]}`

Machine: {n} CPU(s), {m["cpu"]}, {m["platform"]}, Python {m["python"]},
load average (1, 5, 15 min) {load} at start and {load_end} at the end (the machine is shared
with other jobs; see the spread of the runs).

Data: {result["dataset"]}, {result["files"]} files, {result["samples"]} samples,
{result["raw_bytes"] / 1e6:.1f} MB of image + mask bytes as stored.

| what | median wall s | MB/s | median CPU s | runs (wall), s |
| --- | ---: | ---: | ---: | --- |
{table}

**Ingest / raw LMDB write: {result["ratio_ingest_to_raw"]:.2f}** (target >= 0.5); two-pass
ingest / raw: {result["ratio_two_pass_to_raw"]:.2f}. In CPU time (all threads of the process,
less sensitive to the other jobs on the machine), raw / ingest =
{result["cpu_ratio_raw_to_ingest"]:.2f}.

## Where the time goes

CPU seconds of each step of ingest, run on one thread one file at a time (`phases()` in the
script; the raw LMDB write above does only the last two steps):

| step | CPU s | share |
| --- | ---: | ---: |
{steps}

Decoding the PNG files is {100 * (step["decode_image"] + step["decode_mask"]) / total:.0f} % of
the work. Ingest runs in two passes: every file is decoded and checked (on min(8, cores)
threads; Pillow and OpenCV release the GIL) before anything is written, then worker threads
tile and encode the next images (decoding again those beyond the 2 GiB cache) while the main
thread folds in the statistics and puts the records into LMDB. With these step costs and
perfect use of {n} core(s), ingest would take at least (decode + label counts) / cores +
max(statistics + LMDB write, tile/encode / cores) = {ideal:.2f} s, i.e. reach at most
{cpu["raw_lmdb"] / ideal:.2f} of the raw write speed measured in CPU terms; the ratio grows
with the core count, as decoding is the part that parallelises.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", help="folder for the temporary databases (default: system)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        sys.exit(f"{args.data}: no images/ folder; pass --data DIR (a dsb2018 copy)")
    result = run(args.data, args.repeats, args.tmp)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "ingest.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
