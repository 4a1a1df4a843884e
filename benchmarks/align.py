"""Alignment benchmark on ISBI 2012: Scarce's aligner against known deformations and peers.

Trains the ``align-em`` preset on ``isbi2012/unlabeled`` (30 sections; slices 26-29 held out
for the run's own evaluation) for ``--minutes`` (or reuses ``--run``), then evaluates on
``isbi2012/images`` (30 other sections) with seeded known deformations ``u`` (translation +
affine + smooth, largest displacement 4, 16 and 32 px):

- *same* mode: source = ``warp(slice z, u)``, target = slice z (pure registration);
- *pair* mode: source = ``warp(slice z, u)``, target = slice z - 1 (real content change). The
  ISBI stacks are not perfectly aligned: phase correlation finds a rigid offset ``c`` between
  consecutive sections, so the truth is ``compose(u, c)``; the error is reported against it
  and, for reference, against ``u`` alone.

Methods: identity, skimage ``optical_flow_tvl1`` and ``optical_flow_ilk``, direct
coarse-to-fine optimisation of Scarce's own loss on the pixel field (no network), the Scarce
network, and the network + 50 fine-tuning steps. Per cell: mean composition error
``|D(x) + u(x + D(x))|`` over the interior, fold fraction, NCC of the aligned pair next to
the NCC the exact inverse gives (over-warping shows as NCC above it), seconds per 512 x 512
pair. Also the CPC before/after ``scarce align`` on the real (undeformed) ``images`` stack.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/align.py [--minutes 20] [--run RUN]

Writes ``benchmarks/results/align.json`` and ``align.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.registration import (  # noqa: E402
    optical_flow_ilk,
    optical_flow_tvl1,
)

from scarce.align.apply import align_stack  # noqa: E402
from scarce.align.config import AlignConfig  # noqa: E402
from scarce.align.evaluate import composition_error, ncc, random_deformation  # noqa: E402
from scarce.align.pairs import FineTune, fine_tune, network_field, normalise  # noqa: E402
from scarce.align.stack import ingest_stack  # noqa: E402
from scarce.align.task import align_train  # noqa: E402
from scarce.config import config_from_dict, load_config, override  # noqa: E402
from scarce.engine.checkpoint import load_model  # noqa: E402
from scarce.io import list_image_files, read_image  # noqa: E402
from scarce.models.field import fold_fraction, invert, translation, upsample, warp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"
RESULTS = ROOT / "benchmarks" / "results"


def load_slices(folder: Path) -> list[np.ndarray]:
    """Per-slice normalised float32 slices of a folder, sorted by name."""
    out = []
    for f in list_image_files(folder):
        image = read_image(f)[0].astype(np.float32)
        out.append(normalise(image, np.ones(image.shape, bool)))
    return out


def rigid_offset(
    previous: np.ndarray, current: np.ndarray, search: int = 64
) -> tuple[float, float]:
    """``c`` with ``current ~ warp(previous, c)`` (a constant field), pixels.

    The centre of ``current`` (``search`` px in from every side) is matched against
    ``previous`` by normalised cross-correlation over shifts up to ``search`` px
    (``cv2.matchTemplate``), refined to a tenth of a pixel by a parabola through the peak.
    Plain phase correlation fails on half of these pairs (peaks at 100-250 px).
    """
    import cv2

    template = np.ascontiguousarray(current[search:-search, search:-search])
    score = cv2.matchTemplate(previous.astype(np.float32), template, cv2.TM_CCOEFF_NORMED)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)

    def refine(a, b, c):
        den = a - 2 * b + c
        return 0.0 if den == 0 else 0.5 * (a - c) / den

    dy = refine(*score[y - 1 : y + 2, x]) if 0 < y < score.shape[0] - 1 else 0.0
    dx = refine(*score[y, x - 1 : x + 2]) if 0 < x < score.shape[1] - 1 else 0.0
    return float(y + dy - search), float(x + dx - search)


def direct_optimisation(source, target, *, lambda_smooth, kind, levels=4, steps=60):
    """Coarse-to-fine Adam on the pixel field under Scarce's loss, no network (a peer)."""
    s, t = (torch.from_numpy(a)[None, None] for a in (source, target))
    ones = torch.ones_like(s)
    field = None
    for level in range(levels - 1, -1, -1):
        f = 2**level
        sl, tl = (torch.nn.functional.avg_pool2d(x, f) if f > 1 else x for x in (s, t))
        vl = torch.nn.functional.avg_pool2d(ones, f) if f > 1 else ones
        if field is None:
            field = torch.zeros(1, 2, *sl.shape[-2:])
        else:
            field = upsample(field)
        field = fine_tune(field, sl, tl, vl, vl, FineTune(steps, lambda_smooth, kind))
    return field


def run_method(name, source, target, net, cfg):
    """The field ``(1, 2, H, W)`` a method finds for (source -> target), and its seconds."""
    start = time.perf_counter()
    if name == "identity":
        field = torch.zeros(1, 2, *source.shape)
    elif name in ("tvl1", "ilk"):
        flow = (optical_flow_tvl1 if name == "tvl1" else optical_flow_ilk)(target, source)
        field = torch.from_numpy(np.asarray(flow, dtype=np.float32))[None]
    elif name == "direct":
        field = direct_optimisation(
            source, target, lambda_smooth=cfg.loss.lambda_smooth, kind=cfg.loss.smoothness
        )
    else:
        field = network_field(net, source, target, tile_size=1024, device=torch.device("cpu"))
        if name == "scarce+ft":
            s, t = (torch.from_numpy(a)[None, None] for a in (source, target))
            ones = torch.ones_like(s)
            settings = FineTune(50, cfg.loss.lambda_smooth, cfg.loss.smoothness)
            field = fine_tune(field, s, t, ones, ones, settings)
    return field.float(), time.perf_counter() - start


def score(field, truth, source, target, margin):
    """Composition error, folds and NCC of the aligned pair on the interior."""
    inner = (slice(margin, -margin), slice(margin, -margin))
    err = composition_error(field, truth)[0][inner]
    s = torch.from_numpy(source)[None, None]
    aligned = warp(s, field)[0, 0].numpy()[inner]
    exact = warp(s, invert(truth))[0, 0].numpy()[inner]
    return {
        "error_px": float(err.mean()),
        "folds": fold_fraction(field[..., margin:-margin, margin:-margin]),
        "ncc": ncc(aligned, target[inner]),
        "ncc_exact": ncc(exact, target[inner]),
    }


def evaluate(net, cfg, slices, args) -> list[dict]:
    """Every (mode, amplitude, method) cell over ``args.pairs`` pairs."""
    rng = np.random.default_rng(0)
    zs = sorted(rng.choice(np.arange(1, len(slices)), size=args.pairs, replace=False).tolist())
    offsets = {z: rigid_offset(slices[z - 1], slices[z]) for z in zs}
    rows = []
    for mode in ("pair", "same"):
        for amp in args.amplitudes:
            for k, z in enumerate(zs):
                h, w = slices[z].shape
                u = random_deformation((h, w), amp, np.random.default_rng([7, int(amp), k]))
                source = warp(torch.from_numpy(slices[z])[None, None], u)[0, 0].numpy()
                target = slices[z - 1] if mode == "pair" else slices[z]
                c = offsets[z] if mode == "pair" else (0.0, 0.0)
                truth = u + translation(*c, h, w)  # compose(u, c) for a constant c
                margin = int(np.ceil(amp + np.hypot(*c))) + 8
                for method in args.methods:
                    field, seconds = run_method(method, source, target, net, cfg)
                    row = {
                        "mode": mode,
                        "amplitude": amp,
                        "z": z,
                        "method": method,
                        "seconds": seconds,
                        "offset": c,
                        **score(field, truth, source, target, margin),
                    }
                    if mode == "pair":
                        row["error_without_offset_px"] = float(
                            composition_error(field, u)[0][margin:-margin, margin:-margin].mean()
                        )
                    rows.append(row)
                print(
                    mode,
                    amp,
                    z,
                    {r["method"]: round(r["error_px"], 2) for r in rows[-len(args.methods) :]},
                    flush=True,
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of every metric per (mode, amplitude, method)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["mode"], r["amplitude"], r["method"]), []).append(r)
    out = []
    for (mode, amp, method), rs in cells.items():
        keys = ("error_px", "folds", "ncc", "ncc_exact", "seconds", "error_without_offset_px")
        out.append(
            {
                "mode": mode,
                "amplitude": amp,
                "method": method,
                "pairs": len(rs),
                **{k: float(np.mean([r[k] for r in rs])) for k in keys if k in rs[0]},
            }
        )
    return out


def train(args) -> Path:
    """Train the preset on isbi2012/unlabeled within the budget; return the run folder."""
    work = Path(args.work)
    ingest_stack(DATA / "unlabeled", work / "db", test_slices="26:30", overwrite=True)
    cfg = override(
        load_config("align-em", AlignConfig),
        {"max_minutes": args.minutes, **dict(s.split("=") for s in args.set)},
    )
    run = work / "run"
    start = time.perf_counter()
    summary = align_train(
        work / "db" / "train.lmdb", work / "db" / "test.lmdb", run, cfg, overwrite=True
    )
    print(f"trained {summary['steps']} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return run


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    lines = [
        "# Alignment on ISBI 2012 (`benchmarks/align.py`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}  ",
        f"Model: {result['run']} ({result['training']})",
        "",
        "Mean composition error |D(x) + u(x + D(x))| in px over the interior of "
        f"{result['pairs']} pairs per cell (pair mode: against u + the measured rigid offset; "
        "in brackets against u alone), fold %, NCC of the aligned pair / NCC of the exact "
        "inverse, seconds per 512 x 512 pair.",
        "",
    ]
    for mode in ("pair", "same"):
        amps = sorted({c["amplitude"] for c in result["cells"] if c["mode"] == mode})
        lines += [
            f"## {mode} mode",
            "",
            "| method | "
            + " | ".join(f"{a:g} px" for a in amps)
            + " | folds % | NCC / exact | s/pair |",
            "|---" * (len(amps) + 4) + "|",
        ]
        for method in result["methods"]:
            cells = {
                c["amplitude"]: c
                for c in result["cells"]
                if c["mode"] == mode and c["method"] == method
            }
            errs = []
            for a in amps:
                c = cells[a]
                extra = f" ({c['error_without_offset_px']:.2f})" if mode == "pair" else ""
                errs.append(f"{c['error_px']:.2f}{extra}")
            folds = 100 * np.mean([c["folds"] for c in cells.values()])
            nccs = (
                f"{np.mean([c['ncc'] for c in cells.values()]):.3f} / "
                f"{np.mean([c['ncc_exact'] for c in cells.values()]):.3f}"
            )
            secs = np.mean([c["seconds"] for c in cells.values()])
            lines.append(
                f"| {method} | " + " | ".join(errs) + f" | {folds:.3f} | {nccs} | {secs:.2f} |"
            )
        lines.append("")
    if "stack" in result:
        s = result["stack"]
        lines += [
            "## `scarce align` on the real `images` stack",
            "",
            f"Mean CPC (64 px blocks) of consecutive sections: {s['cpc_before']:.3f} before, "
            f"{s['cpc_after']:.3f} after; {s['seconds_per_slice']:.2f} s per slice.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget")
    parser.add_argument("--run", help="reuse a trained run instead of training")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "align"))
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[4.0, 16.0, 32.0])
    parser.add_argument(
        "--methods", nargs="+", default=["identity", "tvl1", "ilk", "direct", "scarce", "scarce+ft"]
    )
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = Path(args.run) if args.run else train(args)
    net, ckpt = load_model(run)
    cfg = config_from_dict(ckpt["config"], AlignConfig)
    slices = load_slices(DATA / "images")
    rows = evaluate(net, cfg, slices, args)
    report = align_stack(run, DATA / "images", Path(args.work) / "aligned", progress=False)
    pairs = report["pairs"]
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    result = {
        "command": "benchmarks/align.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "run": str(run),
        "training": f"{summary.get('steps')} steps, {summary.get('wall_time_s')} s, "
        f"stopped by {summary.get('stop_reason')}",
        "pairs": args.pairs,
        "methods": args.methods,
        "cells": summarise(rows),
        "rows": rows,
        "stack": {
            "cpc_before": float(np.mean([p["cpc_before"] for p in pairs])),
            "cpc_after": float(np.mean([p["cpc_after"] for p in pairs])),
            "seconds_per_slice": report["seconds_per_pair"],
        },
        "wall_s": time.perf_counter() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "align.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "align.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
