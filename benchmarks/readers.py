"""Benchmark: Scarce readers vs raw LMDB reads vs an albumentations DataLoader, same data.

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/readers.py

It builds a training database from 80 images of ``../shared/data/nist_rpe`` (256 x 256 uint16),
then, in one process and alternating the runs (A B A B ...) because this machine's speed swings
with the load of other jobs, measures for ``--rounds`` rounds:

- raw LMDB reads: random records read and decoded (zero-copy), records per second;
- Scarce: augmented, z-scored 256 x 256 patches per second (default augmentation, batch 8) with
  1 and 2 reader workers (:func:`scarce.readers.benchmark_readers`);
- peer: an equivalent albumentations 2.0.8 pipeline (flips, affine rotate/scale/translate,
  Gaussian noise, Gaussian blur, pad + random crop 256) on per-image z-scored float32 images
  read from the same LMDB, in a torch DataLoader with the same worker counts, batch size and
  prefetch depth.

It also times the parts of one Scarce patch in-process (decode, normalisation statistics,
augmentation, target derivation) to show where the time goes. Results go to
``benchmarks/results/readers.json`` and ``readers.md``; the figure is the median over rounds of
the per-round ratio Scarce / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scarce.config import DataConfig, TrainConfig
from scarce.io import list_image_files, read_image, read_mask, stem_of
from scarce.readers import _init_worker, _worker_context, batch_generator, benchmark_readers
from scarce.store import METADATA_KEY, decode_sample, encode_sample, open_env, sample_key

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
            txn.put(sample_key(i), encode_sample(stem_of(file), stem_of(file), (0, 0), image,
                                                 mask, classes))
            samples.append({"name": stem_of(file), "source": stem_of(file), "origin": [0, 0],
                            "shape": list(mask.shape), "classes": classes})
        mean = float(np.mean([m for m, _ in stats]))
        meta = {"format_version": 1, "num_samples": len(samples), "channels": 1,
                "mask_kind": "class", "class_ids": sorted(counts),
                "class_pixel_counts": {str(k): v for k, v in sorted(counts.items())},
                "intensity": {"mean": [mean], "std": [float(np.mean([s for _, s in stats]))],
                              "p1": [0.0], "p99": [0.0]},
                "samples": samples}
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
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(rotate=(0, 360), scale=(0.9, 1.1), translate_percent=0.1, border_mode=reflect,
                 p=1.0),
        A.GaussNoise(std_range=(0.0, 0.1), p=0.5),
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=0.5),
        A.PadIfNeeded(PATCH, PATCH, border_mode=reflect),
        A.RandomCrop(PATCH, PATCH),
    ])


def peer_rate(db: Path, workers: int, seconds: float) -> float:
    """albumentations patches per second through a DataLoader with ``workers`` workers."""
    dataset = PeerDataset(db, length=10**9)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
        prefetch_factor=PREFETCH if workers else None, persistent_workers=workers > 0,
        worker_init_fn=_init_worker,  # same threads and process start as Scarce's workers
        multiprocessing_context=_worker_context() if workers else None)
    iterator = iter(loader)
    for _ in range(2 * max(workers, 1)):
        next(iterator)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        done += 1
    rate = done * BATCH / (time.perf_counter() - start)
    del iterator
    return rate


def breakdown(db: Path, cfg: TrainConfig, patches: int = 200) -> dict:
    """Milliseconds per patch of each stage of a Scarce patch, in this process."""
    from scarce.augment import augment_patch
    from scarce.losses import derive_target
    from scarce.normalize import normalization_params, normalization_spec
    from scarce.store import read_metadata

    spec = normalization_spec("zscore", cfg.data.percentiles, read_metadata(db))
    env, rng = open_env(db), batch_generator(0, 0, 0)
    times = dict.fromkeys(("decode", "normalization_params", "augment_patch", "derive_target"),
                          0.0)
    with env.begin(buffers=True) as txn:
        for i in range(patches):
            t0 = time.perf_counter()
            sample = decode_sample(txn.get(sample_key(i % 80)))
            t1 = time.perf_counter()
            offset, scale = normalization_params(sample.image, spec)
            t2 = time.perf_counter()
            image, mask = augment_patch(sample.image, sample.mask, (128.0, 128.0), PATCH,
                                        cfg.augment, rng, offset=offset, scale=scale)
            t3 = time.perf_counter()
            derive_target(mask, "class", "auto", 2)
            t4 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key] += dt
    env.close()
    return {key: 1000.0 * value / patches for key, value in times.items()}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    import albumentations

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "albumentations": albumentations.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--images", type=int, default=80, help="nist_rpe images in the db")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is absent; see /work/shared/data/nist_rpe/README.md", file=sys.stderr)
        return 1
    cfg = TrainConfig(data=DataConfig(patch_size=PATCH, batch_size=BATCH,
                                      prefetch_batches=PREFETCH))
    runs = {"raw_lmdb_reads": lambda db: raw_reads(db, args.seconds)}
    for w in (1, 2):
        runs[f"scarce_{w}w"] = lambda db, w=w: benchmark_readers(
            db, cfg, seconds=args.seconds, reader_count=w)["patches_per_second"]
        runs[f"albumentations_{w}w"] = lambda db, w=w: peer_rate(db, w, args.seconds)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    load: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = build_db(Path(tmp), args.images)
        parts = breakdown(db, cfg)
        for r in range(args.rounds):
            for name, run in runs.items():
                rates[name].append(run(db))
                load.append(os.getloadavg()[0])
                print(f"round {r + 1}: {name:20s} {rates[name][-1]:9.1f} /s", flush=True)
    write_results(args, rates, parts, load)
    return 0


def write_results(args, rates: dict, parts: dict, load: list[float]) -> None:
    ratio = {w: statistics.median(s / p for s, p in zip(rates[f"scarce_{w}w"],
                                                       rates[f"albumentations_{w}w"]))
             for w in (1, 2)}
    result = {
        "command": "OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python "
                   f"benchmarks/readers.py --seconds {args.seconds:g} --rounds {args.rounds} "
                   f"--images {args.images}",
        "machine": machine(), "patch_size": PATCH, "batch_size": BATCH,
        "rates_per_round": rates, "median": {k: statistics.median(v) for k, v in rates.items()},
        "median_ratio_scarce_over_albumentations": {f"{w}w": ratio[w] for w in (1, 2)},
        "ms_per_patch_in_process": parts, "load_average_1min": load,
        "units": "raw_lmdb_reads: records/s; others: augmented 256x256 patches/s",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "readers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Reader throughput (`benchmarks/readers.py`)", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
             f"{torch.__version__}, albumentations {result['machine']['albumentations']}. "
             f"1-min load average during runs: {min(load):.1f} to {max(load):.1f}.", "",
             "| run | " + " | ".join(f"round {i + 1}" for i in range(args.rounds))
             + " | median |", "|---" * (args.rounds + 2) + "|"]
    for name, values in rates.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in values)
                     + f" | {statistics.median(values):.0f} |")
    lines += ["", "Median per-round ratio Scarce / albumentations: "
              + ", ".join(f"{w} worker(s) {ratio[w]:.2f}" for w in (1, 2)) + ".", "",
              "In-process ms per 256x256 patch: "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + "."]
    (args.out / "readers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
