"""Block-wise prediction of a 20,000 x 20,000 OME-Zarr image on a 2-worker local Dask cluster.

The image is made by tiling real nist_rpe images (256 x 256 uint16, each tile drawn with a
random dihedral transform, seeded), written as OME-Zarr chunk by chunk (never whole in memory).
A nist_rpe model (``runs/nist`` of the README's 600-step recipe) predicts class map and
instances on a ``LocalCluster`` of 2 single-threaded worker processes with a 2 GB memory limit
each (``scarce.segment.scaleout.predict_zarr``, what ``scarce predict --workers 2`` runs).
Measured: wall time and megapixels/s, peak RSS of each worker process (``ru_maxrss``) and of
this process, and on a crop straddling four blocks: the class map against in-memory
``predict_image`` of the crop (inner part, away from the crop's own borders) and whether every
object inside the crop that crosses a block border is one object (one id) in the block-wise
instances.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/large_image.py --model runs/nist
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

from scarce.data import omezarr
from scarce.engine.checkpoint import load_model
from scarce.io import list_image_files, read_image
from scarce.segment import blockwise
from scarce.segment.predict import instance_options, instances_from_prediction, predict_image
from scarce.segment.scaleout import predict_zarr
from scarce.segment.task import target_of

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nist_rpe" / "images"


def tiled_image(size: int, chunk: int, seed: int = 0):
    """Lazy ``(1, size, size)`` uint16 mosaic of nist_rpe tiles (a dask array)."""
    import dask.array as da

    tiles = np.stack([read_image(f)[0] for f in list_image_files(DATA)])  # (100, 256, 256)
    n = -(-size // 256)
    rng = np.random.default_rng(seed)
    choice, turns, flips = (rng.integers(0, k, (n, n)) for k in (len(tiles), 4, 2))

    def block(block_info=None):
        (c0, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        out = np.empty((1, y1 - y0, x1 - x0), np.uint16)
        for ty in range(y0 // 256, -(-y1 // 256)):
            for tx in range(x0 // 256, -(-x1 // 256)):
                t = np.rot90(tiles[choice[ty, tx]], turns[ty, tx])
                t = t[:, ::-1] if flips[ty, tx] else t
                ys, xs = max(y0, ty * 256), max(x0, tx * 256)
                ye, xe = min(y1, ty * 256 + 256), min(x1, tx * 256 + 256)
                out[0, ys - y0 : ye - y0, xs - x0 : xe - x0] = t[
                    ys - ty * 256 : ye - ty * 256, xs - tx * 256 : xe - tx * 256
                ]
        return out

    return da.map_blocks(
        block, chunks=((1,), *(da.core.normalize_chunks(chunk, (size,))[0],) * 2), dtype=np.uint16
    )


def monitor(work: Path, stop: threading.Event, every: float = 15.0) -> None:
    """Every ``every`` s: chunks of the class map written, RSS of each worker process (the
    children of this one), load; into ``work/progress.json`` (kept if the run is cut short)."""
    import psutil

    me, start, peaks, rows = psutil.Process(), time.perf_counter(), {}, []
    while not stop.wait(every):
        rss = {}
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss[child.pid] = child.memory_info().rss
        peaks = {pid: max(peaks.get(pid, 0), v) for pid, v in rss.items()} | {
            pid: v for pid, v in peaks.items() if pid not in rss
        }
        written = sum(1 for _ in work.glob(".*.tmp/labels/class_map/s0/*/*"))
        rows.append(
            {
                "s": round(time.perf_counter() - start),
                "class_map_chunks": written,
                "rss_gb": sorted(round(v / 2**30, 3) for v in rss.values()),
                "load": round(os.getloadavg()[0], 2),
            }
        )
        progress = {
            "peak_rss_gb_by_pid": {p: round(v / 2**30, 3) for p, v in peaks.items()},
            "samples": rows,
        }
        (work / "progress.json").write_text(json.dumps(progress, indent=1))


def crop_check(model_path, image_path, out_group, centre, half, chunk, options) -> dict:
    """Class map and instances of a crop: block-wise (from the output) vs in memory."""
    model, ckpt = load_model(model_path)
    margin = 2 * blockwise.context_depth(model)
    lo, hi = centre - half - margin, centre + half + margin
    raw = omezarr.open_image(image_path).array[:, lo:hi, lo:hi].compute()
    probs = predict_image(model, raw, ckpt, **options).numpy()
    inner = (slice(margin, -margin),) * 2
    classes = omezarr.open_labels(out_group, "class_map")[lo:hi, lo:hi].compute()
    same = classes[inner] == probs.argmax(0)[inner]
    result = {"crop": [lo + margin, hi - margin], "class_map_equal_fraction": float(same.mean())}
    labels = omezarr.open_labels(out_group, "instances")[lo:hi, lo:hi].compute()
    local = instances_from_prediction(probs, target_of(ckpt).rule, **instance_options(ckpt))
    # objects wholly inside the inner crop: one global id each, and no other object with it
    border = np.zeros(local.shape, bool)
    border[inner] = True
    outside = np.unique(local[~border])
    ids = [i for i in np.unique(local[border]) if i and i not in outside]
    grid = np.zeros(local.shape, bool)  # block borders inside the crop
    for line in range(lo // chunk * chunk, hi, chunk):
        if lo < line < hi:
            grid[line - lo - 1 : line - lo + 1, :] = grid[:, line - lo - 1 : line - lo + 1] = True
    crossing = once = 0
    for i in ids:
        mask = local == i
        globals_ = np.unique(labels[mask])
        if grid[mask].any():
            crossing += 1
            once += (
                len(globals_) == 1
                and globals_[0] != 0
                and (labels == globals_[0]).sum() == mask.sum()
            )
    result.update(objects_inside=len(ids), crossing_block_borders=crossing, counted_once=int(once))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/nist")
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=3904)
    parser.add_argument("--tile", type=int, default=1536)
    parser.add_argument("--overlap", type=float, default=0.15625)  # 240 px = 2 x 112 + 16
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory", default="2GB")
    parser.add_argument("--work", default="bench-large")
    parser.add_argument("--name", default="large_image")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    image = work / f"nist_{args.size}.ome.zarr"
    t0 = time.perf_counter()
    if not image.exists():
        with omezarr.staged(image) as group:
            omezarr.write_image(group, tiled_image(args.size, 2048), chunks=2048)
    make_s = time.perf_counter() - t0
    options = dict(tile_size=args.tile, overlap=args.overlap, blend="gaussian", batch_size=1)
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            memory_limit=args.memory,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        stop = threading.Event()
        threading.Thread(target=monitor, args=(work, stop), daemon=True).start()
        t0 = time.perf_counter()
        row = predict_zarr(
            args.model, image, work / "out", instances=True, chunk=args.chunk, threads=1, **options
        )
        seconds = time.perf_counter() - t0
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        stop.set()
    out_group = Path(row["output"])
    centre = 2 * args.chunk
    check = crop_check(args.model, image, out_group, centre, 768, args.chunk, options)
    _, ckpt = load_model(args.model)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "image": [args.size, args.size],
        "model": {"path": args.model, **ckpt["model"]},
        "workers": args.workers,
        "memory_limit": args.memory,
        "chunk": args.chunk,
        **options,
        "make_image_s": round(make_s, 1),
        "predict_s": round(seconds, 1),
        "megapixels_per_s": round(args.size**2 / 1e6 / seconds, 3),
        "instances": row["instances"],
        "peak_rss_per_worker_gb": sorted(round(v / 2**30, 3) for v in peaks.values()),
        "peak_rss_client_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "crop_check": check,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{os.cpu_count()} CPU(s), {platform.platform()}, Python {platform.python_version()}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    return 0


def markdown(r: dict) -> str:
    c = r["crop_check"]
    return f"""# Block-wise prediction of a {r["image"][0]:,} x {r["image"][1]:,} OME-Zarr image

Command (repository root): `OMP_WAIT_POLICY=PASSIVE .venv/bin/{r["command"]}`

Machine: {r["machine"]}; load average {r["load_average_start"]} at the start and
{r["load_average_end"]} at the end (the machine is shared with other jobs).

Image: real nist_rpe tiles (256 x 256 uint16, random dihedral transforms, seed 0) tiled to
{r["image"][0]:,} x {r["image"][1]:,} px, OME-Zarr chunks of 2048 (made in {r["make_image_s"]} s).
Model: `{r["model"]["path"]}` ({r["model"]["name"]}, {json.dumps(r["model"]["arguments"])}).
Dask: LocalCluster of {r["workers"]} worker processes x 1 thread, memory limit {r["memory_limit"]}
each; blocks of {r["chunk"]} px (+ the halo as context), tiles {r["tile_size"]} px, overlap
{r["overlap"]}, batch {r["batch_size"]}.

| measure | value |
|---|---|
| wall time (class map + instances, written as OME-Zarr) | {r["predict_s"]} s |
| throughput | {r["megapixels_per_s"]} Mpx/s |
| peak RSS per worker | {", ".join(f"{v} GB" for v in r["peak_rss_per_worker_gb"])} |
| peak RSS of the client process | {r["peak_rss_client_gb"]} GB |
| instances | {r["instances"]} |
| crop {c["crop"]} (straddles 4 blocks): class map equal to in-memory `predict_image` | {100 * c["class_map_equal_fraction"]:.4f} % of pixels |
| objects inside the crop / crossing a block border / counted once | {c["objects_inside"]} / {c["crossing_block_borders"]} / {c["counted_once"]} |
"""


if __name__ == "__main__":
    sys.exit(main())
