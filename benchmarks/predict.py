"""Benchmark: Scarce's sliding-window prediction against MONAI's, same network, same settings.

Run from the repository root (a few minutes on 2 idle CPU cores; longer on a busy machine)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/predict.py

Network: the default :class:`scarce.models.UNet` (width 32, depth 4, 1 input channel,
2 classes), randomly initialised (seed 0), eval mode, float32 on the CPU. Images: a
normalised (z-score) isbi2012 section, 512x512, and a 2048x2048 mosaic of 16 different
sections (4 x 4). Settings for both implementations: 256x256 tiles, 4 tiles per forward
pass, Gaussian blending with sigma = tile / 8, overlap 0.25 and 0.5.

- **scarce**: :func:`scarce.segment.predict.sliding_window_logits` (``blend="gaussian"``);
- **monai**: ``monai.inferers.sliding_window_inference(roi_size=(256, 256),
  sw_batch_size=4, overlap=..., mode="gaussian", sigma_scale=0.125)``.

Both run under ``torch.inference_mode`` in the same process, alternated (scarce, monai,
scarce, monai, ...) after one untimed warm-up each, so drifts in machine load hit both alike.
Both cut the same tile grids (e.g. 3 x 3 tiles for 512 px, 15 x 15 for 2048 px at overlap
0.5), so the network does the same work; the difference is the tiling overhead. Reported:
wall seconds per run, megapixels (10^6 image pixels) per second of the median run, and the
median over pairs of (monai seconds / scarce seconds), i.e. Scarce's speed relative to
MONAI's (> 1: Scarce is faster). Also the largest logit difference between the two and the
fraction of pixels with the same argmax class: they differ near tile seams because Scarce
zeroes a halo margin along inner tile edges (with these small overlaps the margin is below
the network's halo, so neither is exactly the whole-image result).

Results go to ``benchmarks/results/predict.json`` and ``benchmarks/results/predict.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scarce.data.normalize import normalize  # noqa: E402
from scarce.engine.tiling import sliding_window_logits  # noqa: E402
from scarce.io import read_image  # noqa: E402
from scarce.models import UNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012" / "images"
SPEC = {"mode": "zscore", "percentiles": [1, 99.8], "mean": None, "std": None}
TILE, BATCH = 256, 4


def bench_images() -> dict[int, torch.Tensor]:
    """Normalised images ``(1, 1, S, S)`` float32 for S = 512 (one section) and 2048 (mosaic)."""
    sections = [read_image(DATA / f"{i:02d}.png") for i in range(16)]  # (1, 512, 512) uint8
    mosaic = np.concatenate(
        [np.concatenate(sections[r * 4 : r * 4 + 4], axis=2) for r in range(4)], axis=1
    )
    return {
        512: torch.from_numpy(normalize(sections[0], SPEC))[None],
        2048: torch.from_numpy(normalize(mosaic, SPEC))[None],
    }


def run_scarce(model, x: torch.Tensor, overlap: float) -> torch.Tensor:
    """Scarce logits ``(1, K, H, W)``."""
    logits = sliding_window_logits(
        model, x[0], tile_size=TILE, overlap=overlap, blend="gaussian", batch_size=BATCH
    )
    return logits[None]


def run_monai(model, x: torch.Tensor, overlap: float) -> torch.Tensor:
    """MONAI logits ``(1, K, H, W)``."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        return sliding_window_inference(
            x,
            roi_size=(TILE, TILE),
            sw_batch_size=BATCH,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=0.125,
            progress=False,
        )


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds (all threads of this process) of ``fn(*args)``, and its result."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, out


def measure(model, x: torch.Tensor, overlap: float, repeats: int) -> dict:
    """Alternate scarce and monai ``repeats`` times each; seconds, Mpx/s, ratios, agreement."""
    wall: dict[str, list[float]] = {"scarce": [], "monai": []}
    cpu: dict[str, list[float]] = {"scarce": [], "monai": []}
    outputs = {}
    for _ in range(repeats):
        for name, fn in (("scarce", run_scarce), ("monai", run_monai)):
            seconds, used, outputs[name] = timed(fn, model, x, overlap)
            wall[name].append(seconds)
            cpu[name].append(used)
    a, b = outputs["scarce"], outputs["monai"]
    megapixels = x.shape[-2] * x.shape[-1] / 1e6
    median = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "size": list(x.shape[-2:]),
        "overlap": overlap,
        "repeats": repeats,
        "seconds": wall,
        "cpu_seconds": cpu,
        "median_seconds": median,
        "megapixels_per_s": {k: megapixels / t for k, t in median.items()},
        "median_speed_ratio_scarce_to_monai": statistics.median(
            m / s for s, m in zip(wall["scarce"], wall["monai"])
        ),
        "median_cpu_ratio_monai_to_scarce": statistics.median(
            m / s for s, m in zip(cpu["scarce"], cpu["monai"])
        ),
        "max_abs_logit_difference": float((a - b).abs().max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
    }


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
    import monai

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__.split("+")[0],
        "monai": monai.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _rows(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        mp, sec, cpu = r["megapixels_per_s"], r["seconds"], r["cpu_seconds"]
        rows.append(
            f"| {r['size'][0]}x{r['size'][1]} | {r['overlap']} | {mp['scarce']:.3f} | "
            f"{mp['monai']:.3f} | **{r['median_speed_ratio_scarce_to_monai']:.2f}** | "
            f"{r['median_cpu_ratio_monai_to_scarce']:.2f} | "
            f"{', '.join(f'{t:.1f}' for t in sec['scarce'])} | "
            f"{', '.join(f'{t:.1f}' for t in sec['monai'])} | "
            f"{', '.join(f'{a:.1f} / {b:.1f}' for a, b in zip(cpu['scarce'], cpu['monai']))} | "
            f"{r['max_abs_logit_difference']:.3g} | {100 * r['argmax_agreement']:.2f} % |"
        )
    head = (
        "| image | overlap | Scarce Mpx/s | MONAI Mpx/s | speed ratio (wall) | CPU-time ratio | "
        "Scarce runs, s | MONAI runs, s | CPU s, Scarce / MONAI | max abs logit diff | "
        "same argmax |\n| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |"
    )
    return head + "\n" + "\n".join(rows)


def markdown(result: dict) -> str:
    """The markdown report."""
    m = result["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in result["load_average_at_end"])
    return f"""# Prediction benchmark: Scarce vs MONAI sliding window

Command (from the repository root): `{result["command"]}`

Machine: {m["nproc"]} CPU(s), {m["cpu"]}, {m["platform"]}, Python {m["python"]},
torch {m["torch"]} ({m["torch_threads"]} threads), MONAI {m["monai"]}; load average
{load} at the start and {load_end} at the end (the machine was shared with other jobs, so
wall times swing from run to run; the runs alternate so both implementations see the same
load, and CPU seconds of this process are given as a steadier second measure).

Network: default UNet (width 32, depth 4, 1 -> 2 channels, random init, eval, float32).
Tiles 256x256, 4 per batch, Gaussian blending (sigma = tile / 8). Images: isbi2012
section 00 (512x512) and a 4 x 4 mosaic of sections 00-15 (2048x2048), z-score normalised.
Megapixels/s are of the median run. Speed ratio: median over alternated pairs of MONAI
wall seconds / Scarce wall seconds; CPU-time ratio: the same with CPU seconds (> 1: Scarce
faster).

{_rows(result["runs"])}

Tiling overhead alone: the same settings with a pointwise network (one 1x1 convolution, so
the network costs almost nothing) on the 2048x2048 image:

{_rows(result["overhead_runs"])}

Both cut the same tile grid, so the network cost is equal and the ratio measures the tiling,
blending and stitching overhead. The outputs differ near tile seams: Scarce zeroes the
weight in a margin along inner tile edges (the overlap-tile strategy, up to the network's
halo, capped at half the overlap), MONAI blends the whole tile.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats-512", type=int, default=3, help="pairs for 512x512")
    parser.add_argument("--repeats-2048", type=int, default=1, help="pairs for 2048x2048")
    parser.add_argument("--repeats-overhead", type=int, default=3, help="pairs, 1x1 network")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], choices=[512, 2048])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: isbi2012 images not found (../shared/data beside the repository)")
    logging.getLogger("scarce.engine.tiling").setLevel(logging.ERROR)  # the margin warning, known
    info = machine()
    torch.manual_seed(0)
    model = UNet(1, 2).eval()
    pointwise = torch.nn.Conv2d(1, 2, 1).eval()
    images = bench_images()
    run_scarce(model, images[512], 0.5), run_monai(model, images[512], 0.5)  # warm-up
    overhead = [measure(pointwise, images[2048], o, args.repeats_overhead) for o in args.overlaps]
    repeats_of = {512: args.repeats_512, 2048: args.repeats_2048}
    runs = []
    for size, overlap in ((s, o) for s in args.sizes for o in args.overlaps):
        runs.append(measure(model, images[size], overlap, repeats_of[size]))
        mp = runs[-1]["megapixels_per_s"]
        print(
            f"{size} overlap {overlap}: scarce {mp['scarce']:.3f} Mpx/s, monai "
            f"{mp['monai']:.3f} Mpx/s",
            flush=True,
        )
    result = {
        "command": shlex.join(["OMP_WAIT_POLICY=PASSIVE", ".venv/bin/python", *sys.argv]),
        "network": "UNet(1, 2, width=32, depth=4), random init (seed 0), eval, float32, CPU",
        "tile": TILE,
        "batch": BATCH,
        "blend": "gaussian, sigma = tile / 8",
        "runs": runs,
        "overhead_runs": overhead,
        "machine": info,
        "load_average_at_end": list(os.getloadavg()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "predict.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "predict.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
