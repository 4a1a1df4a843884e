"""Benchmark: the plan's predicted wall time and memory against the run, and what it reaches.

Run from the repository root (about 9 x 9 minutes on 2 CPU cores)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/plan.py

For nist_rpe, isbi2012 and bbbc039 (every 5th image by sorted name is test), and seeds 0, 1,
2, it runs the newcomer's command with no config::

    scarce train --train-db DB/train.lmdb --test-db DB/test.lmdb --out RUN \\
                 --max-minutes 8 --amp off --seed S

(``--amp off`` stands for a CPU without bf16), which plans first (``RUN/plan.json``), then
trains. It records the plan (its choices, the planning time, the predicted training wall time
and peak memory) against what the run measured (the wall time of ``train()`` and the trainer's
peak RSS, both in ``plan.json``), and scores the last checkpoint on the test database
(:func:`scarce.segment.curve.score_checkpoint`: pooled foreground Dice; object F1 at IoU 0.5
for bbbc039's instances). The 1-minute load average is sampled every 15 s during each run,
because other jobs on a shared machine slow the run after the plan has measured it.

Results: ``benchmarks/results/plan.json`` (one entry per run, merged by dataset and seed) and
``benchmarks/results/plan.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = HERE / "results"
DATASETS = {"nist_rpe": "class", "isbi2012": "class", "bbbc039": "instance"}
TARGETS = {
    "nist_rpe": ("fg_dice", 0.93),
    "isbi2012": ("fg_dice", 0.94),
    "bbbc039": ("object_f1", 0.85),
}


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``every`` seconds until stopped."""

    def __init__(self, every: float = 15.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(os.getloadavg()[0])
            self.done.wait(self.every)

    def stop(self) -> list[float]:
        self.done.set()
        self.join()
        return self.samples


def ingest_once(name: str, work: Path) -> Path:
    """``work/db/NAME``: every 5th image by sorted name is test (ingested once)."""
    from scarce.data.ingest import ingest
    from scarce.demo import every_nth_split

    db = work / "db" / name
    if not (db / "test.lmdb").is_dir():
        images = DATA / name / "images"
        ingest(
            images,
            DATA / name / "masks",
            db,
            split=every_nth_split(images, n=5),
            mask_kind=DATASETS[name],
            overwrite=True,
            progress=False,
        )
    return db


def run_one(name: str, seed: int, args) -> dict:
    """Plan + train with the CLI, then score; the entry stored in plan.json."""
    from scarce.segment.curve import score_checkpoint

    work = Path(args.work)
    db = ingest_once(name, work)
    run = work / "runs" / f"{name}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "scarce",
        "train",
        "--train-db",
        str(db / "train.lmdb"),
        "--test-db",
        str(db / "test.lmdb"),
        "--out",
        str(run),
        "--max-minutes",
        str(args.minutes),
        "--amp",
        args.amp,
        "--seed",
        str(seed),
        "--overwrite",
    ]
    sampler = LoadSampler()
    sampler.start()
    start = time.perf_counter()
    with open(work / f"{name}-seed{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    command_s = time.perf_counter() - start
    loads = sampler.stop()
    plan = json.loads((run / "plan.json").read_text())
    score = score_checkpoint(run / "checkpoints" / "last.pt", db / "test.lmdb", device="cpu")
    c = plan["config"]
    metric, target = TARGETS[name]
    entry = {
        "dataset": name,
        "seed": seed,
        "budget_min": args.minutes,
        "planning_s": plan["seconds"],
        "downscale": c["data"]["downscale"],
        "patch": c["data"]["patch_size"],
        "batch": c["data"]["batch_size"],
        "width": c["model"]["width"],
        "depth": c["model"]["depth"],
        "amp": c["amp"],
        "readers": c["data"]["reader_count"],
        **timing(plan),
        "command_s": round(command_s, 1),
        "fg_dice": round(score["fg_dice"], 4),
        "object_f1": None if score["object_f1"] is None else round(score["object_f1"], 4),
        "target": f"{metric} >= {target}",
        "met": bool(score[metric] >= target),
        "load_at_plan": plan["machine"].get("load_1min"),
        "load_during": [
            round(min(loads), 2),
            round(sum(loads) / len(loads), 2),
            round(max(loads), 2),
        ],
        "command": "scarce " + " ".join(shlex.quote(a) for a in cmd[3:]),
        "run": str(run),
    }
    print(json.dumps(entry), flush=True)
    return entry


def timing(plan: dict) -> dict:
    """Predicted against measured time and memory, from a run's ``plan.json``.

    ``predicted_train_s`` is the plan's total for ``max_steps``; a run stopped early by
    ``max_minutes`` (other jobs slowed it) did fewer steps, so the error is also given for
    the steps it did: set-up + steps x predicted step + its evaluations x predicted evaluation.
    """
    p, m, c = plan["predicted"], plan["measured"], plan["config"]
    done = m["steps"]
    evals = -(-done // c["test_every_n_steps"])
    for_done = (
        p["setup_seconds"] + done * p["seconds_per_step"] + evals * p["seconds_per_evaluation"]
    )
    return {
        "max_steps": c["max_steps"],
        "steps": done,
        "stop_reason": m["stop_reason"],
        "predicted_train_s": round(p["total_seconds"], 1),
        "measured_train_s": m["wall_seconds"],
        "time_error_pct": round(100 * (m["wall_seconds"] / p["total_seconds"] - 1), 1),
        "predicted_for_steps_done_s": round(for_done, 1),
        "step_error_pct": round(100 * (m["wall_seconds"] / for_done - 1), 1),
        "predicted_s_per_step": round(p["seconds_per_step"], 3),
        "predicted_peak_mb": round(p["peak_memory_bytes"] / 2**20),
        "measured_peak_mb": round(m["peak_memory_bytes"] / 2**20),
    }


def merge(path: Path, entries: list[dict]) -> list[dict]:
    """Existing entries with those of the same dataset and seed replaced."""
    old = json.loads(path.read_text())["entries"] if path.is_file() else []
    keys = {(e["dataset"], e["seed"]) for e in entries}
    kept = [e for e in old if (e["dataset"], e["seed"]) not in keys]
    order = list(DATASETS)
    return sorted(kept + entries, key=lambda e: (order.index(e["dataset"]), e["seed"]))


def render(entries: list[dict], meta: dict) -> str:
    """plan.md: the runs, predicted against measured, and the accuracy targets."""
    lines = [
        "# `scarce plan`: predicted against measured, and the planned 8-minute run's accuracy",
        "",
        f"Made by `benchmarks/plan.py` ({meta['date']}) on {meta['cpu']}, {meta['nproc']} cores "
        f"shared with other jobs, Python {meta['python']}, torch {meta['torch']}.",
        "",
        "Each run is the newcomer's command (no config; it plans first, then trains):",
        "",
        "    scarce train --train-db DB/train.lmdb --test-db DB/test.lmdb --out RUN \\",
        "                 --max-minutes 8 --amp off --seed S",
        "",
        "Reproduce: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/plan.py`; every 5th "
        "image by sorted name is test; scores are of the last checkpoint on the test database "
        "(pooled foreground Dice; bbbc039 also object F1 at IoU 0.5 of the watershed instances).",
        "",
        "*predicted train s*: the plan's total for `max_steps`; *measured*: the wall time of "
        "`train()` (the plan is made before it, in the same process and budget). A run that "
        "other jobs slowed stops at `max_minutes` with fewer steps: *error for the steps done* "
        "compares the measured time with the plan's prediction for the steps it did.",
        "",
        "| dataset | seed | plan (downscale, patch, batch, width) | steps done / planned | "
        "planning s | predicted train s | measured train s | error | error for the steps done | "
        "predicted peak MiB | measured peak MiB | fg Dice | object F1 | target | "
        "load at plan / during (min, mean, max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        f1 = "-" if e["object_f1"] is None else f"{e['object_f1']:.4f}"
        lines.append(
            f"| {e['dataset']} | {e['seed']} | {e['downscale']:g}, {e['patch']}, {e['batch']}, "
            f"{e['width']} | {e['steps']} / {e['max_steps']} | {e['planning_s']:.0f} | "
            f"{e['predicted_train_s']:.0f} | {e['measured_train_s']:.0f} | "
            f"{e['time_error_pct']:+.0f} % | {e['step_error_pct']:+.0f} % | "
            f"{e['predicted_peak_mb']} | {e['measured_peak_mb']} | "
            f"{e['fg_dice']:.4f} | {f1} | {e['target']}: {'met' if e['met'] else 'MISSED'} | "
            f"{e['load_at_plan']} / {', '.join(map(str, e['load_during']))} |"
        )
    lines += ["", "Commands, in order:", ""]
    lines += [f"    {e['command']}" for e in entries]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--amp", default="off", help="off stands for a CPU without bf16")
    parser.add_argument("--work", default="benchmarks/work/plan", help="databases, runs and logs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--render-only", action="store_true", help="recompute the table from the runs' plan.json"
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.render_only:
        saved = json.loads((results / "plan.json").read_text())
        for e in saved["entries"]:
            e.setdefault("run", str(Path(args.work) / "runs" / f"{e['dataset']}-seed{e['seed']}"))
            e.update(timing(json.loads((Path(e["run"]) / "plan.json").read_text())))
        (results / "plan.json").write_text(json.dumps(saved, indent=1) + "\n")
        (results / "plan.md").write_text(render(saved["entries"], saved["meta"]))
        return 0
    entries = [
        run_one(name, int(seed), args)
        for name in args.datasets.split(",")
        for seed in args.seeds.split(",")
    ]
    import torch

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    results.mkdir(parents=True, exist_ok=True)
    merged = merge(results / "plan.json", entries)
    (results / "plan.json").write_text(
        json.dumps({"meta": meta, "entries": merged}, indent=1) + "\n"
    )
    (results / "plan.md").write_text(render(merged, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
