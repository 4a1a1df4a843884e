"""Benchmark: Scarce readers vs raw LMDB reads vs an albumentations DataLoader, same data.

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/readers.py

It builds a training database from 80 images of ``../shared/data/nist_rpe`` (256 x 256 uint16),
then, in one process and alternating the runs (A B A B ...) because this machine's speed swings
with the load of other jobs, measures for ``--rounds`` rounds:

- raw LMDB reads: random records read and decoded (zero-copy), records per second;
- Scarce: augmented, z-scored 256 x 256 patches per second (default augmentation, batch 8) with
  1 and 2 reader workers (:func:`scarce.data.monitor.benchmark_readers`);
- peer: an equivalent albumentations 2.0.8 pipeline (flips, affine rotate/scale/translate,
  Gaussian noise, Gaussian blur, pad + random crop 256) on per-image z-scored float32 images
  read from the same LMDB, in a torch DataLoader with the same worker counts, batch size and
  prefetch depth.

Each rate is given twice: wall-clock patches per second (what this machine delivered while
shared with other jobs) and patches per worker-CPU-second (the workers' user + system time from
``/proc``; the rate per worker when it has a core to itself, independent of the load).
It also times the parts of one Scarce patch in-process (decode, normalisation statistics,
augmentation, target derivation) to show where the time goes. Results go to
``benchmarks/results/readers.json`` and ``readers.md``; the figure is the median over rounds of
the per-round ratio Scarce / peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from scarce.config import DataConfig, TrainConfig
from scarce.data.normalize import normalization_spec
from scarce.data.store import (
    METADATA_KEY,
    decode_sample,
    encode_sample,
    open_env,
    read_metadata,
    sample_key,
)
from scarce.data.workers import batch_generator, init_worker, worker_context
from scarce.io import list_image_files, read_image, read_mask, stem_of
from scarce.segment.readers import make_train_loader

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nist_rpe"
PATCH, BATCH, PREFETCH = 256, 8, 4


def build_db(folder: Path, count: int) -> Path:
    """Write ``count`` nist_rpe image/mask pairs (sorted by name) as a Scarce training LMDB."""
    path = folder / "train.lmdb"
    masks = {stem_of(p): p for p in list_image_files(DATA / "masks")}
    samples, counts, stats = [], {}, []
    env = open_env(path, write=True, map_size=1 << 32)
    with env.begin(write=True) as txn:
        for i, file in enumerate(list_image_files(DATA / "images")[:count]):
            image, mask = read_image(file), read_mask(masks[stem_of(file)])
            classes = [int(c) for c in np.unique(mask)]
            for c in classes:
                counts[c] = counts.get(c, 0) + int((mask == c).sum())
            stats.append((image.mean(), image.std()))
            txn.put(
                sample_key(i),
                encode_sample(
                    stem_of(file), stem_of(file), (0, 0), {"image": image, "mask": mask}, classes
                ),
            )
            samples.append(
                {
                    "name": stem_of(file),
                    "source": stem_of(file),
                    "origin": [0, 0],
                    "shape": list(mask.shape),
                    "classes": classes,
                }
            )
        mean = float(np.mean([m for m, _ in stats]))
        meta = {
            "format_version": 1,
            "num_samples": len(samples),
            "channels": 1,
            "mask_kind": "class",
            "class_ids": sorted(counts),
            "class_pixel_counts": {str(k): v for k, v in sorted(counts.items())},
            "intensity": {
                "mean": [mean],
                "std": [float(np.mean([s for _, s in stats]))],
                "p1": [0.0],
                "p99": [0.0],
            },
            "samples": samples,
        }
        txn.put(METADATA_KEY, json.dumps(meta).encode())
    env.close()
    return path


def raw_reads(db: Path, seconds: float) -> float:
    """Random records read and decoded (no pixel copy) per second, in this process."""
    env = open_env(db)
    n = json.loads(bytes(env.begin().get(METADATA_KEY)))["num_samples"]
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    with env.begin(buffers=True) as txn:
        while time.perf_counter() - start < seconds:
            for i in rng.integers(n, size=64):
                decode_sample(txn.get(sample_key(int(i))))
                done += 1
    rate = done / (time.perf_counter() - start)
    env.close()
    return rate


class PeerDataset(torch.utils.data.Dataset):
    """albumentations pipeline on per-image z-scored float32 images from the same LMDB."""

    def __init__(self, db: Path, length: int):
        self.db, self.length, self.env, self.transform = db, length, None, None
        self.count = json.loads(bytes(read_once(db, METADATA_KEY)))["num_samples"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int):
        if self.env is None:  # opened in the worker, after the fork
            self.env, self.transform = open_env(self.db), peer_transform()
        with self.env.begin(buffers=True) as txn:
            sample = decode_sample(txn.get(sample_key(item % self.count)))
            image = sample.image[0].astype(np.float32)
            mask = np.array(sample.mask)
        image = (image - image.mean()) / max(float(image.std()), 1e-6)
        out = self.transform(image=image, mask=mask)
        return torch.from_numpy(out["image"][None]), torch.from_numpy(out["mask"].astype(np.int64))


def read_once(db: Path, key: bytes) -> bytes:
    env = open_env(db)
    try:
        return bytes(env.begin().get(key))
    finally:
        env.close()


def peer_transform():
    """The augmentation the Scarce defaults do, written with albumentations 2.0.8."""
    import albumentations as A
    import cv2

    reflect = cv2.BORDER_REFLECT_101
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(
                rotate=(0, 360), scale=(0.9, 1.1), translate_percent=0.1, border_mode=reflect, p=1.0
            ),
            A.GaussNoise(std_range=(0.0, 0.1), p=0.5),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=0.5),
            A.PadIfNeeded(PATCH, PATCH, border_mode=reflect),
            A.RandomCrop(PATCH, PATCH),
        ]
    )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes ``pids`` so far, seconds (from /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def timed(iterator, pids: list[int], seconds: float, warmup: int) -> tuple[float, ...]:
    """Rates of a batch iterator after a warm-up.

    Returns wall patches/s, patches per worker-CPU-second and the consumer's (this
    process's) CPU milliseconds per batch. The last two do not depend on what else the
    machine runs: the second is the rate each worker reaches with a core to itself.
    """
    for _ in range(warmup):
        next(iterator)
    done, cpu0, own0, start = 0, cpu_seconds(pids), time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        done += 1
    wall, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu0
    own = time.process_time() - own0
    return done * BATCH / wall, done * BATCH / max(cpu, 1e-9), 1000.0 * own / max(done, 1)


def scarce_rate(db: Path, cfg: TrainConfig, workers: int, seconds: float) -> tuple[float, ...]:
    """Scarce rates (see :func:`timed`) with ``workers`` reader workers.

    The same loop as :func:`scarce.data.monitor.benchmark_readers`, plus the workers' CPU time.
    """
    cfg = replace(cfg, data=replace(cfg.data, reader_count=workers))
    spec = normalization_spec("zscore", cfg.data.percentiles, read_metadata(db))
    with make_train_loader(db, cfg, norm_spec=spec) as batches:
        next(batches)
        return timed(batches, batches.worker_pids, seconds, 2 * workers)


def peer_rate(db: Path, workers: int, seconds: float) -> tuple[float, ...]:
    """albumentations rates (see :func:`timed`) with ``workers`` workers."""
    dataset = PeerDataset(db, length=10**9)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0)
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=PREFETCH,
        persistent_workers=True,
        worker_init_fn=init_worker,  # same threads and process start as Scarce's workers
        multiprocessing_context=worker_context(),
    )
    iterator = iter(loader)
    next(iterator)
    rates = timed(iterator, [w.pid for w in iterator._workers], seconds, 2 * workers)
    iterator._shutdown_workers()
    return rates


def breakdown(db: Path, cfg: TrainConfig, patches: int = 400) -> dict:
    """CPU milliseconds per 256x256 patch of each stage, in this process (one thread).

    CPU time (``time.process_time``) rather than wall time, so the figures do not depend on
    what else the machine runs. ``scarce_whole_patch`` is a whole in-process batch (sampling,
    decode, cached normalisation, augmentation, target, copy into the batch tensor) divided by
    its patches; ``albumentations_whole_patch`` is one peer ``__getitem__`` plus collation.
    """
    from scarce.data.augment import augment_patch
    from scarce.data.normalize import normalization_params
    from scarce.segment.targets import derive_target

    torch.set_num_threads(1)
    spec = normalization_spec("zscore", cfg.data.percentiles, read_metadata(db))
    env, rng, clock = open_env(db), batch_generator(0, 0, 0), time.process_time
    times = dict.fromkeys(("decode", "normalization_params", "augment_patch", "derive_target"), 0.0)
    with env.begin(buffers=True) as txn:
        for i in range(patches):
            t0 = clock()
            sample = decode_sample(txn.get(sample_key(i % 80)))
            t1 = clock()
            offset, scale = normalization_params(sample.image, spec)
            t2 = clock()
            centre = (float(rng.integers(256)), float(rng.integers(256)))  # as the readers
            _, mask = augment_patch(
                sample.image,
                sample.mask,
                centre,
                PATCH,
                cfg.augment,
                rng,
                offset=offset,
                scale=scale,
            )
            t3 = clock()
            derive_target(mask, "class", "auto", 2)
            t4 = clock()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key] += dt
    env.close()
    with make_train_loader(db, cfg, norm_spec=spec) as batches:  # reader_count 0: in-process
        next(batches)
        start = clock()
        for _ in range(patches // BATCH):
            next(batches)
        times["scarce_whole_patch"] = clock() - start
    peer, collate = PeerDataset(db, length=patches), torch.utils.data.default_collate
    start = clock()
    for i in range(0, patches, BATCH):
        collate([peer[j] for j in range(i, i + BATCH)])
    times["albumentations_whole_patch"] = clock() - start
    return {key: 1000.0 * value / patches for key, value in times.items()}


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import albumentations

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "albumentations": albumentations.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement, seconds")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--images", type=int, default=80, help="nist_rpe images in the db")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is absent; see /work/shared/data/nist_rpe/README.md", file=sys.stderr)
        return 1
    cfg = TrainConfig(
        data=DataConfig(
            patch_size=PATCH, batch_size=BATCH, reader_count=0, prefetch_batches=PREFETCH
        )
    )
    runs = {"raw_lmdb_reads": lambda db: (raw_reads(db, args.seconds), math.nan, math.nan)}
    for w in (1, 2):
        runs[f"scarce_{w}w"] = lambda db, w=w: scarce_rate(db, cfg, w, args.seconds)
        runs[f"albumentations_{w}w"] = lambda db, w=w: peer_rate(db, w, args.seconds)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in runs if name != "raw_lmdb_reads"}
    consumer: dict[str, list[float]] = {name: [] for name in cpu_rates}
    load: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = build_db(Path(tmp), args.images)
        parts = breakdown(db, cfg)
        for r in range(args.rounds):
            for name, run in runs.items():
                wall, per_cpu, own = run(db)
                rates[name].append(wall)
                if name in cpu_rates:
                    cpu_rates[name].append(per_cpu)
                    consumer[name].append(own)
                load.append(os.getloadavg()[0])
                print(
                    f"round {r + 1}: {name:20s} {wall:9.1f} /s  {per_cpu:7.1f} per worker-CPU-s",
                    flush=True,
                )
    write_results(args, rates, cpu_rates, consumer, parts, load)
    return 0


def median_ratios(rates: dict) -> dict:
    """Median over rounds of the per-round ratio Scarce / albumentations, per worker count."""
    return {
        f"{w}w": statistics.median(
            s / p for s, p in zip(rates[f"scarce_{w}w"], rates[f"albumentations_{w}w"])
        )
        for w in (1, 2)
    }


def table(rates: dict, rounds: int, digits: int = 0) -> list[str]:
    lines = [
        "| run | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | median |",
        "|---" * (rounds + 2) + "|",
    ]
    for name, values in rates.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.{digits}f}" for v in values)
            + f" | {statistics.median(values):.{digits}f} |"
        )
    return lines


def write_results(
    args, rates: dict, cpu_rates: dict, consumer: dict, parts: dict, load: list[float]
) -> None:
    """Write ``readers.json`` and ``readers.md`` under ``args.out``."""
    ratio, cpu_ratio = median_ratios(rates), median_ratios(cpu_rates)
    idle_2w = {
        name: 2 * statistics.median(cpu_rates[f"{name}_2w"])
        for name in ("scarce", "albumentations")
    }
    result = {
        "command": "OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python "
        f"benchmarks/readers.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--images {args.images}",
        "machine": machine(),
        "patch_size": PATCH,
        "batch_size": BATCH,
        "units": "raw_lmdb_reads: records/s; others: augmented 256x256 patches/s",
        "wall_rates_per_round": rates,
        "wall_median": {k: statistics.median(v) for k, v in rates.items()},
        "median_ratio_scarce_over_albumentations_wall": ratio,
        "patches_per_worker_cpu_second_per_round": cpu_rates,
        "median_ratio_scarce_over_albumentations_per_cpu": cpu_ratio,
        "consumer_cpu_ms_per_batch_per_round": consumer,
        "projected_2w_patches_per_second_one_core_per_worker": idle_2w,
        "cpu_ms_per_patch_in_process": parts,
        "load_average_1min": load,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "readers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Reader throughput (`benchmarks/readers.py`)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores shared "
        f"with other jobs (1-min load average during the runs {min(load):.1f} to "
        f"{max(load):.1f}); torch {torch.__version__}, albumentations "
        f"{result['machine']['albumentations']}. Runs alternate within each round.",
        "",
        "## Wall-clock rate (records/s for raw reads, augmented 256x256 patches/s else)",
        "",
        *table(rates, args.rounds),
        "",
        "Median per-round ratio Scarce / albumentations: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items())
        + ".",
        "",
        "## Patches per worker-CPU-second (independent of the machine's load)",
        "",
        *table(cpu_rates, args.rounds),
        "",
        "Median per-round ratio Scarce / albumentations: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_ratio.items())
        + ". With one free "
        "core per worker, 2 workers would deliver about "
        + ", ".join(f"{k} {v:.0f}" for k, v in idle_2w.items())
        + " patches/s.",
        "",
        f"Goal (at least the peer's rate, at least 800 patches/s with 2 workers): "
        f"Scarce / peer {ratio['2w']:.2f} (wall) and {cpu_ratio['2w']:.2f} (per CPU) with "
        f"2 workers; 2 workers delivered a median "
        f"{statistics.median(rates['scarce_2w']):.0f} patches/s wall-clock on this shared "
        f"machine and would deliver about {idle_2w['scarce']:.0f} with two free cores.",
        "",
        "Consumer (main process) CPU ms per batch of 8, median: "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in consumer.items())
        + ".",
        "",
        "## Where a Scarce patch's time goes (in-process CPU ms per patch, one thread)",
        "",
        "| stage | ms |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in parts.items()),
    ]
    (args.out / "readers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
