"""The GPU path, checked in one run of under 8 minutes on a lent GPU (see gpu_check.sh).

Measures, on the first CUDA device, and writes ``benchmarks/results/gpu.md`` (and ``gpu.json``):

1. ``scarce plan`` for 8 minutes on nist_rpe (or synthetic disks when no data is there):
   its choices, predicted step time and peak memory;
2. training steps/s at 256 x 256 for the planned and the default model (width 32), batch 64
   and 256, in bf16, bf16 + channels_last, bf16 + channels_last + torch.compile (random
   data on the GPU: the network's own speed);
3. a real 60-second run of the planned config (readers, evaluation, checkpoints): measured
   step time and peak memory against the plan's prediction, and the data-wait share;
4. the readers' augmented patches/s at 256 x 256 with 1, 4, 8 and 14 workers, and how many it
   takes to feed the fastest training rate of step 2;
5. sliding-window prediction megapixels/s on a 4096 x 4096 image (bf16);
6. alignment: FieldNet (align-em preset) pairs/s at 256 x 256, training step (a proxy loss)
   and inference.

Goal (issue 14): >= 2,000 training images/s at 256 x 256 without data starvation on one
H100/H200 (NVIDIA's DALI nnU-Net 2D reports 674-927 images/s on an A100).
Every section is time-boxed and guarded: a failure is written into the report, not raised.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
OUT = HERE / "results"
REPORT: dict = {"sections": {}, "errors": {}}


def section(name: str):
    """Run a measurement; record its result, or its error, under ``name``."""

    def wrap(fn):
        start = time.perf_counter()
        try:
            REPORT["sections"][name] = fn()
        except Exception:  # noqa: BLE001 - the report says what failed; the others still run
            REPORT["errors"][name] = traceback.format_exc(limit=4)
        REPORT.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {REPORT['seconds'][name]} s", flush=True)
        return fn

    return wrap


def database() -> Path:
    """``WORK/db``: nist_rpe (every 5th image test) if found, else 100 synthetic 256-px images."""
    from scarce.data.ingest import ingest
    from scarce.demo import every_nth_split

    db = WORK / "db"
    if (db / "train.lmdb").is_dir():
        return db
    data = Path(os.environ.get("DATA", HERE.parent.parent / "shared" / "data")) / "nist_rpe"
    if not (data / "images").is_dir():
        sys.path.insert(0, str(HERE.parent))
        from tests.shared import synthetic_db

        REPORT["data"] = "synthetic disks, 100 images 256 x 256"
        return synthetic_db(
            WORK / "synthetic", [(256, 256)] * 100, kind="class", radius=20, test=20
        )
    REPORT["data"] = str(data)
    images = data / "images"
    ingest(
        images, data / "masks", db, split=every_nth_split(images), overwrite=True, progress=False
    )
    return db


def steps_per_second(width: int, depth: int, batch: int, *, channels_last: bool, compile_: bool):
    """Training steps/s of a U-Net on random 256 x 256 data in bf16 (median of 10 steps)."""
    from scarce.engine.probe import time_calls
    from scarce.models import build_model
    from scarce.segment.losses import SegmentationLoss

    dev = torch.device("cuda")
    model = build_model("unet", 1, 2, width=width, depth=depth).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = SegmentationLoss("dice_ce", 2).to(dev)
    x = torch.randn(batch, 1, 256, 256, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch, 256, 256), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(x)
        loss_fn(logits.float(), y).backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = time_calls(step, warmup=3 if compile_ else 2, repeats=10, device=dev)
    return {
        "width": width,
        "depth": depth,
        "batch": batch,
        "channels_last": channels_last,
        "compile": compile_,
        "images_per_s": round(batch / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main() -> int:
    torch.backends.cudnn.benchmark = True
    REPORT["gpu"] = torch.cuda.get_device_name(0)
    REPORT["torch"] = torch.__version__
    db = database()
    train_db, test_db = db / "train.lmdb", db / "test.lmdb"
    state: dict = {}

    @section("plan")
    def _():
        from scarce.segment.plan import format_plan, plan_run

        plan = plan_run(train_db, test_db, minutes=8, device="cuda")
        state["plan"] = plan
        return {"text": format_plan(plan), "predicted": plan.predicted, "seconds": plan.seconds}

    @section("train_steps")
    def _():
        plan = state.get("plan")
        planned = (plan.config.model.width, plan.config.model.depth) if plan else (32, 4)
        rows = []
        for width, depth in dict.fromkeys([planned, (32, 4)]):
            for batch in (64, 256):
                for cl, comp in ((False, False), (True, False), (True, True)):
                    rows.append(
                        steps_per_second(width, depth, batch, channels_last=cl, compile_=comp)
                    )
        state["best_rate"] = max(r["images_per_s"] for r in rows)
        return rows

    @section("planned_run")
    def _():
        from scarce.config import override
        from scarce.segment.task import train

        plan = state["plan"]
        cfg = override(plan.config, {"max_minutes": 1.0, "test_every_n_steps": 10**6})
        start = time.perf_counter()
        summary = train(train_db, test_db, WORK / "run", cfg, overwrite=True)
        wall = time.perf_counter() - start
        step_s = summary["wall_time_s"] / max(summary["steps"], 1)
        return {
            "steps": summary["steps"],
            "measured_s_per_step": round(step_s, 4),
            "predicted_s_per_step": round(plan.predicted["seconds_per_step"], 4),
            "measured_peak_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
            "predicted_peak_gib": round(plan.predicted["peak_memory_bytes"] / 2**30, 2),
            "data_wait_pct": (summary.get("last_eval") or {}).get("data_wait_pct"),
            "wall_s": round(wall, 1),
        }

    @section("readers")
    def _():
        from scarce.config import load_config, override
        from scarce.segment.readers import benchmark_readers

        cfg = override(load_config("default"), {"data.patch_size": 256, "data.batch_size": 64})
        rows = []
        for n in (1, 4, 8, 14):
            r = benchmark_readers(train_db, cfg, seconds=5, reader_count=n)
            rows.append({"workers": n, "patches_per_s": round(r["patches_per_second"], 1)})
        per_worker = max(r["patches_per_s"] / r["workers"] for r in rows)
        need = state.get("best_rate", 2000.0)
        return {"rows": rows, "workers_to_feed_best_rate": int(np.ceil(need / per_worker))}

    @section("sliding_window")
    def _():
        from scarce.engine.tiling import sliding_window_logits
        from scarce.models import build_model

        model = build_model("unet", 1, 2, width=16, depth=4).cuda().eval()
        image = torch.randn(1, 4096, 4096)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sliding_window_logits(model, image[:, :1024, :1024], tile_size=1024, batch_size=8)
            torch.cuda.synchronize()
            start = time.perf_counter()
            sliding_window_logits(model, image, tile_size=1024, overlap=0.25, batch_size=8)
            torch.cuda.synchronize()
        return {"megapixels_per_s": round(4096 * 4096 / 1e6 / (time.perf_counter() - start), 1)}

    @section("alignment")
    def _():
        from scarce.align.config import AlignConfig
        from scarce.config import load_config
        from scarce.engine.probe import time_calls
        from scarce.models import build_model

        m = load_config("align-em", AlignConfig).model
        args = {
            k: getattr(m, k)
            for k in (
                "levels",
                "encoder_widths",
                "aligner_widths",
                "kernel_size",
                "finest_level",
                "correlation_radius",
                "smoothing",
                "match_temperature",
                "input_level",
                "match_channels",
            )
        }
        net = build_model(m.name, 1, **args).cuda()
        net.open_levels = m.levels
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        src, tgt = torch.randn(2, 16, 1, 256, 256, device="cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fields = net(src, tgt)
            sum(f.float().square().mean() for f in fields.values()).backward()
            opt.step()

        @torch.no_grad()
        def infer():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                net(src, tgt)

        train_s = time_calls(step, warmup=2, repeats=5, device="cuda")
        infer_s = time_calls(infer, warmup=2, repeats=5, device="cuda")
        return {
            "train_pairs_per_s": round(16 / train_s, 1),
            "infer_pairs_per_s": round(16 / infer_s, 1),
        }

    write(REPORT)
    return 0


def write(report: dict) -> None:
    """``results/gpu.json`` and ``results/gpu.md``."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    s = report["sections"]
    lines = [
        "# GPU check (`benchmarks/gpu_check.sh`)",
        "",
        f"{report.get('gpu')}, torch {report.get('torch')}; data: {report.get('data')}; "
        f"seconds per section: {report.get('seconds')}",
        "",
    ]
    if "plan" in s:
        lines += ["## scarce plan (8 min)", "", "```", s["plan"]["text"], "```", ""]
    if "train_steps" in s:
        lines += [
            "## Training images/s at 256 x 256 (bf16, random data on the GPU)",
            "",
            "| width | depth | batch | channels_last | compile | images/s | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['width']} | {r['depth']} | {r['batch']} | {r['channels_last']} | "
            f"{r['compile']} | {r['images_per_s']} | {r['peak_gib']} |"
            for r in s["train_steps"]
        ]
        best = max(r["images_per_s"] for r in s["train_steps"])
        lines += ["", f"Best: {best} images/s (goal >= 2,000).", ""]
    for name in ("planned_run", "readers", "sliding_window", "alignment"):
        if name in s:
            lines += [f"## {name}", "", "```", json.dumps(s[name], indent=1), "```", ""]
    for name, error in report["errors"].items():
        lines += [f"## {name}: FAILED", "", "```", error, "```", ""]
    (OUT / "gpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
