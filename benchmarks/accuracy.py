"""Benchmark: Scarce's recommended configs vs a plain MONAI recipe, same splits, same steps.

Run from the repository root (about 20 minutes per dataset on 2 CPU cores)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/accuracy.py

For each dataset in ``../shared/data`` it makes a fixed split, then

- **scarce**: ingests the split (:func:`scarce.data.ingest.ingest`), trains the preset recommended
  for the data (preset ``default.yaml`` for nist_rpe, ``em-membranes.yaml`` for isbi2012,
  ``nuclei-instances.yaml`` for bbbc039) for exactly ``--steps`` steps with the peer's patch
  and batch size (early stopping off, one reader worker), predicts the test images from the
  last checkpoint (:func:`scarce.segment.predict.predict_files`; no selection on the test set);
- **monai**: trains the peer recipe of ``benchmarks/peer_monai.py`` (BasicUNet, DiceCE, MONAI
  flips/rotations/affine/noise, Adam 1e-3) for the same steps, patch and batch, and predicts
  with MONAI's sliding window;

and scores both through the same :func:`scarce.segment.evaluate.evaluate_arrays` call on the same test
masks: pooled foreground Dice and IoU (one confusion matrix over all test pixels), mean
per-image Dice, pixel accuracy, Rand error of the foreground components and, for bbbc039,
object F1 / AP at IoU 0.5 (Scarce: watershed instances from its 3-class boundary target;
MONAI: connected components of the predicted foreground).

Splits: nist_rpe and bbbc039, every 5th image by sorted name is test; isbi2012, slices
24-29 are test. Results are merged into ``benchmarks/results/accuracy.json`` (one entry per
dataset and recipe, each with the command that made it) and rendered as
``benchmarks/results/accuracy.md``; text between ``<!-- notes -->`` and ``<!-- /notes -->`` in
an existing accuracy.md is kept. ``--set KEY=VALUE`` overrides the Scarce config (to try
alternatives; the recipe is then named ``scarce[KEY=VALUE]``); ``--steps`` other than 300 and
``--seed`` other than 0 tag the recipe the same way (``scarce[steps=600]``). Scarce trains
with its presets' ``amp: auto`` (bf16 on a CPU with bf16 instructions); the MONAI peer in
float32, as a plain MONAI user would; the table's *precision* column says which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from peer_monai import predict_monai, train_monai  # noqa: E402

from scarce.config import load_config, override  # noqa: E402
from scarce.demo import every_nth_split  # noqa: E402
from scarce.io import (  # noqa: E402
    list_image_files,
    read_image,
    read_mask,
    stem_of,
    write_label_image,
)
from scarce.segment.evaluate import evaluate_arrays  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = HERE / "results"
THREADS = 2  # torch intra-op threads for both recipes
DEFAULT_STEPS = 300  # the MONAI reference: 300 steps; other step counts tag the recipe
DATASETS = {
    # name: recommended preset, mask kind, object evaluation
    "nist_rpe": {"preset": "default.yaml", "mask_kind": "class", "instances": False},
    "isbi2012": {"preset": "em-membranes.yaml", "mask_kind": "class", "instances": False},
    "bbbc039": {"preset": "nuclei-instances.yaml", "mask_kind": "instance", "instances": True},
}
COLUMNS = (
    "dataset",
    "recipe",
    "steps",
    "precision",
    "train wall time",
    "fg Dice pooled",
    "mean per-image Dice",
    "mIoU",
    "pixel acc.",
    "Rand error",
    "object F1@0.5",
    "AP@0.5",
)
NOTES = ("<!-- notes -->", "<!-- /notes -->")


def make_split(name: str, images_dir: Path) -> dict:
    """``{"train": [stems], "test": [stems]}``: isbi2012 slices 24-29 test, else every 5th.

    Raises
    ------
    FileNotFoundError
        If ``images_dir`` holds no image (the dataset is missing).
    """
    if name == "isbi2012":
        stems = [stem_of(p) for p in list_image_files(images_dir)]
        if not stems:
            raise FileNotFoundError(f"no images in {images_dir}")
        test = [s for s in stems if 24 <= int(s) <= 29]
        return {"train": [s for s in stems if s not in test], "test": test}
    return every_nth_split(images_dir, n=5)


def load_pairs(root: Path, stems: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(stem, image (C, H, W), mask (H, W))`` for ``stems``, in sorted-name order."""
    masks = {stem_of(p): p for p in list_image_files(root / "masks")}
    wanted = set(stems)
    return [
        (stem_of(f), read_image(f), read_mask(masks[stem_of(f)]))
        for f in list_image_files(root / "images")
        if stem_of(f) in wanted
    ]


def scarce_config(name: str, args, sets: dict):
    """The dataset's recommended preset with the benchmark's equal-footing overrides."""
    cfg = load_config(DATASETS[name]["preset"])
    return override(
        cfg,
        {
            "max_steps": args.steps,
            "max_minutes": None,
            "early_stopping": 0,
            "test_every_n_steps": max(1, args.steps // 3),
            "data.patch_size": args.patch,
            "data.batch_size": args.batch,
            "data.reader_count": 1,
            "threads": THREADS,
            "device": "cpu",
            "seed": args.seed,
            **sets,
        },
    )


def run_scarce(name: str, split: dict, work: Path, args, sets: dict) -> dict:
    """Ingest, train, predict the test images; return timings and the evaluation pairs."""
    from scarce.data.ingest import ingest
    from scarce.segment.predict import predict_files
    from scarce.segment.task import train

    spec, root = DATASETS[name], DATA / name
    db = work / "db"
    ingest(
        root / "images",
        root / "masks",
        db,
        split=split,
        mask_kind=spec["mask_kind"],
        overwrite=True,
        progress=False,
    )
    cfg = scarce_config(name, args, sets)
    start = time.perf_counter()
    summary = train(db / "train.lmdb", db / "test.lmdb", work / "run", cfg, overwrite=True)
    train_s = time.perf_counter() - start
    test_dir = work / "test_images"
    test_dir.mkdir(parents=True, exist_ok=True)
    for f in list_image_files(root / "images"):
        if stem_of(f) in split["test"] and not (test_dir / f.name).exists():
            (test_dir / f.name).symlink_to(f.resolve())
    start = time.perf_counter()
    predict_files(
        work / "run" / "checkpoints" / "last.pt",
        test_dir,
        work / "pred",
        instances=spec["instances"],
        device="cpu",
        progress=False,
    )
    predict_s = time.perf_counter() - start
    suffix = "_instances.tif" if spec["instances"] else ".tif"
    preds = {s: read_mask(work / "pred" / f"{s}{suffix}") for s in split["test"]}
    return {
        "steps": summary["steps"],
        "train_wall_s": train_s,
        "predict_wall_s": predict_s,
        "trainer_wall_s": summary["wall_time_s"],
        "preds": preds,
        "amp": summary["amp"],
        "pred_kind": "instances" if spec["instances"] else "classes",
    }


def run_monai(name: str, split: dict, work: Path, args) -> dict:
    """Train and apply the MONAI peer (class maps to ``work/pred``); instances: ``mask > 0``."""
    train_pairs = [
        (im, (m > 0).astype(np.uint8) if DATASETS[name]["instances"] else m)
        for _, im, m in load_pairs(DATA / name, split["train"])
    ]
    start = time.perf_counter()
    model = train_monai(
        train_pairs, args.steps, args.patch, args.batch, lr=1e-3, seed=args.seed, threads=THREADS
    )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    preds = {
        s: predict_monai(model, im, patch=args.patch)
        for s, im, _ in load_pairs(DATA / name, split["test"])
    }
    predict_s = time.perf_counter() - start
    (work / "pred").mkdir(parents=True, exist_ok=True)
    for stem, pred in preds.items():
        write_label_image(work / "pred" / f"{stem}.tif", pred)
    return {
        "steps": args.steps,
        "train_wall_s": train_s,
        "predict_wall_s": predict_s,
        "preds": preds,
        "amp": "off",
        "pred_kind": "classes",
    }


def score(name: str, split: dict, run: dict) -> dict:
    """Metrics of one recipe's test predictions (the same call for both recipes)."""
    instances = DATASETS[name]["instances"]
    truth = {s: m for s, _, m in load_pairs(DATA / name, split["test"])}
    pairs = [(s, truth[s], run["preds"][s]) for s in split["test"]]
    metrics, rows = evaluate_arrays(
        pairs,
        num_classes=None if instances else 2,
        instances=instances,
        truth_kind="instances" if instances else "classes",
        pred_kind=run["pred_kind"],
    )
    per_image = [r["mean_dice"] for r in rows if r["mean_dice"] is not None]
    out = {
        "fg_dice_pooled": metrics["per_class"][1]["dice"],
        "mean_per_image_dice": float(np.mean(per_image)),
        "mean_iou": metrics["mean_iou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "rand_error": metrics["rand_error"],
        "test_images": len(pairs),
    }
    if instances:
        o = metrics["objects"]["0.50"]
        out.update(
            object_f1_050=o["f1"],
            object_ap_050=o["ap"],
            object_tp_050=o["tp"],
            object_fp_050=o["fp"],
            object_fn_050=o["fn"],
            mean_ap=metrics["mean_ap"],
        )
    return out


def benchmark_one(name: str, recipe: str, args, sets: dict) -> dict:
    """Run and score one (dataset, recipe); the entry stored in accuracy.json."""
    split = make_split(name, DATA / name / "images")
    tags = [f"{k}={v}" for k, v in sets.items()]
    tags += [f"steps={args.steps}"] if args.steps != DEFAULT_STEPS else []
    tags += [f"seed={args.seed}"] if args.seed else []
    label = recipe + (f"[{','.join(tags)}]" if tags else "")
    work = Path(args.out) / name / label
    load_before = os.getloadavg()[0]
    print(
        f"[{time.strftime('%H:%M:%S')}] {name} / {label}: {len(split['train'])} train, "
        f"{len(split['test'])} test images, {args.steps} steps",
        flush=True,
    )
    run = (
        run_scarce(name, split, work, args, sets)
        if recipe == "scarce"
        else run_monai(name, split, work, args)
    )
    entry = {
        "dataset": name,
        "recipe": label,
        "steps": run["steps"],
        "train_wall_s": round(run["train_wall_s"], 1),
        "predict_wall_s": round(run["predict_wall_s"], 1),
        "patch": args.patch,
        "batch": args.batch,
        "seed": args.seed,
        "amp": run["amp"],
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": command_line(),
        **score(name, split, run),
    }
    if "trainer_wall_s" in run:
        entry["trainer_wall_s"] = run["trainer_wall_s"]
    print(json.dumps(entry), flush=True)
    return entry


def command_line() -> str:
    """The command that reproduces this run, from the repository root."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/accuracy.py {args}".strip()


def machine() -> dict:
    """CPU model, core count and library versions of this machine."""
    import monai

    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            model,
        )
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "torch_threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
    }


def merge_results(path: Path, entries: list[dict]) -> dict:
    """Existing accuracy.json with ``entries`` replacing those of the same dataset and recipe."""
    old = json.loads(path.read_text())["results"] if path.is_file() else []
    keys = {(e["dataset"], e["recipe"]) for e in entries}
    results = [e for e in old if (e["dataset"], e["recipe"]) not in keys] + entries
    order = list(DATASETS)
    results.sort(
        key=lambda e: (
            order.index(e["dataset"]),
            e["recipe"] != "scarce",
            e["recipe"] != "monai",
            e["recipe"],
        )
    )
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "machine": machine(),
        "results": results,
    }


def _cell(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict]) -> list[str]:
    """Markdown table lines, one row per (dataset, recipe)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for e in results:
        amp = e.get("amp", "off")
        cells = [
            e["dataset"],
            e["recipe"],
            str(e["steps"]),
            "float32" if amp == "off" else amp,
            f"{e['train_wall_s'] / 60:.1f} min",
            _cell(e["fg_dice_pooled"]),
            _cell(e["mean_per_image_dice"]),
            _cell(e["mean_iou"]),
            _cell(e["pixel_accuracy"]),
            _cell(e["rand_error"]),
            _cell(e.get("object_f1_050"), ".3f"),
            _cell(e.get("object_ap_050"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison(results: list[dict]) -> list[str]:
    """One line per dataset: Scarce minus MONAI at equal steps (fg Dice pooled, object F1)."""
    lines = []
    for name in DATASETS:
        got = {e["recipe"]: e for e in results if e["dataset"] == name}
        if "scarce" not in got or "monai" not in got:
            continue
        s, m = got["scarce"], got["monai"]
        if s["steps"] != m["steps"]:
            lines.append(f"- {name}: steps differ ({s['steps']} vs {m['steps']}); not compared.")
            continue
        d = s["fg_dice_pooled"] - m["fg_dice_pooled"]
        text = (
            f"- {name}: Scarce {'at or above' if d >= 0 else 'below'} MONAI by "
            f"{d:+.4f} pooled foreground Dice"
        )
        if s.get("object_f1_050") is not None and m.get("object_f1_050") is not None:
            text += f", {s['object_f1_050'] - m['object_f1_050']:+.3f} object F1@0.5"
        lines.append(
            text + f" (train wall time {s['train_wall_s'] / m['train_wall_s']:.2f}x the peer's)."
        )
    return lines


def render(data: dict, notes: str) -> str:
    """The whole accuracy.md."""
    mach = data["machine"]
    commands = sorted({e["command"] for e in data["results"]})
    return "\n".join(
        [
            "# Accuracy: Scarce vs a plain MONAI recipe, same splits, same steps",
            "",
            f"Made by `benchmarks/accuracy.py` (last update {data['date']}) on {mach['cpu']}, "
            f"{mach['nproc']} cores shared with other jobs (1-minute load average before/after "
            f"each run in accuracy.json), {mach['torch_threads']} torch threads for both recipes, "
            f"Python {mach['python']}, torch {mach['torch']}, MONAI {mach['monai']}.",
            "",
            "Reproduce (from the repository root; the runs that made these rows):",
            "",
            *[f"    {c}" for c in commands],
            "",
            *table(data["results"]),
            "",
            "Splits: nist_rpe and bbbc039, every 5th image by sorted name is test; isbi2012, slices "
            "24-29. Equal footing: same steps, patch and batch size, one data-loading worker each, "
            "seed 0, the last weights (no checkpoint chosen on the test set). Scarce's wall time "
            "includes its three test evaluations and checkpoint writes during training. Both "
            "recipes are scored by the same `scarce.segment.evaluate.evaluate_arrays` call: *fg Dice "
            "pooled* and *mIoU* (foreground classes) from one confusion matrix over all test pixels; "
            "*mean per-image Dice* averages the per-image foreground Dice; *Rand error* is the "
            "adapted Rand error of foreground components (bbbc039: of instances) averaged over "
            "images; object F1/AP at IoU 0.5 count one-to-one matches summed over images "
            "(Scarce: seeded watershed of its interior/boundary classes, objects < 20 px removed; "
            "MONAI: 4-connected components of the predicted foreground).",
            "",
            "Scarce minus MONAI:",
            "",
            *comparison(data["results"]),
            "",
            NOTES[0],
            notes.strip("\n"),
            NOTES[1],
            "",
        ]
    )


def old_notes(path: Path) -> str:
    """The hand-written text between the notes markers of an existing accuracy.md."""
    if not path.is_file():
        return ""
    text = path.read_text()
    if NOTES[0] not in text or NOTES[1] not in text:
        return ""
    return text.split(NOTES[0], 1)[1].split(NOTES[1], 1)[0]


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}"
    )
    parser.add_argument("--recipes", default="scarce,monai", help="scarce, monai or both")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="training steps of each recipe"
    )
    parser.add_argument("--patch", type=int, default=256, help="training patch side, pixels")
    parser.add_argument("--batch", type=int, default=4, help="patches per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Scarce config override (repeatable), e.g. loss.name=ce",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "work" / "accuracy"),
        help="work folder for databases, runs and predictions",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for accuracy.json/.md")
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.recipes = [r for r in args.recipes.split(",") if r]
    bad = [d for d in args.datasets if d not in DATASETS]
    bad += [r for r in args.recipes if r not in ("scarce", "monai")]
    if bad or args.steps < 1 or any("=" not in s for s in args.set):
        parser.error(
            f"unknown dataset/recipe {bad}, steps < 1 or a --set without '=': "
            f"datasets are {list(DATASETS)}, recipes scarce and monai"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write accuracy.json and accuracy.md; return the exit status."""
    args = parse_args(argv)
    missing = [d for d in args.datasets if not (DATA / d / "images").is_dir()]
    if missing:
        print(
            f"missing datasets {missing} under {DATA}; see shared/data/*/README.md", file=sys.stderr
        )
        return 2
    torch.set_num_threads(THREADS)
    sets = dict(s.split("=", 1) for s in args.set)
    entries = []
    for name in args.datasets:
        for recipe in args.recipes:
            entries.append(benchmark_one(name, recipe, args, sets if recipe == "scarce" else {}))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    data = merge_results(results / "accuracy.json", entries)
    (results / "accuracy.json").write_text(json.dumps(data, indent=1) + "\n")
    md = results / "accuracy.md"
    md.write_text(render(data, old_notes(md)))
    print(f"wrote {results / 'accuracy.json'} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
