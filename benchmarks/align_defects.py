"""Alignment through defects on ISBI 2012: masks from a Scarce defect model, voting, drift.

Part 1, pairs. A defect detector (a Scarce segmentation model, ``scarce defects-train``) is
trained on synthetic cracks, folds and missing data of ``isbi2012/unlabeled``. Aligners are
trained on a copy of that stack in which half the sections carry a synthetic defect:
``nomask`` (the defects, no masks in the loss), ``model`` (masks predicted by the detector),
``true`` (the generators' masks); ``plain`` is an aligner that never saw a defect. Each is
evaluated on pairs of ``isbi2012/images`` (source: slice z deformed by a known smooth field,
then damaged; target: slice z - 1) by the composition error away from defects (outside a
16 px band around them; inside a crack the truth is a tear) and the fold fraction; the masks
the aligner was trained with also go to the network (no matching on a defect, no averaging of
matches across it) and weight 30 fine-tuning steps per pair. ``plain+model`` is the aligner that
never saw a defect given the detector's masks. The detector's per-class IoU on held-out
synthetic defects is reported.

Part 2, a stack. ``isbi2012/images`` made rigid (consecutive offsets removed), every slice
deformed by a known field, slice 10 blanked (missing data) and slice 20 folded: the error of
every slice against its truth (in the reference slice's frame) with and without voting
(``--vote 3``), the drift (error at the last slice) with and without drift decay, and the
largest difference between fields computed by 2 worker processes and by one.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/align_defects.py [--minutes 8] \
        [--plain RUN --finetune-steps 300]

With ``--plain RUN --finetune-steps N`` the three defect aligners start from ``RUN`` (an aligner
trained on clean sections) and are fine-tuned on the damaged stack for N steps, as one would
in practice; otherwise each is trained from scratch for ``--minutes``.

Writes ``benchmarks/results/align_defects.json`` and ``align_defects.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align import DATA, load_slices, rigid_offset  # noqa: E402

from scarce.align.apply import align_stack  # noqa: E402
from scarce.align.config import AlignConfig  # noqa: E402
from scarce.align.defects import crack, fold, make_defect_dataset, random_defect  # noqa: E402
from scarce.align.evaluate import composition_error, random_deformation  # noqa: E402
from scarce.align.pairs import FineTune, fine_tune, network_field  # noqa: E402
from scarce.align.stack import ingest_stack  # noqa: E402
from scarce.align.task import align_train  # noqa: E402
from scarce.config import config_from_dict, load_config, override  # noqa: E402
from scarce.data.ingest import ingest  # noqa: E402
from scarce.demo import every_nth_split  # noqa: E402
from scarce.engine.checkpoint import load_model  # noqa: E402
from scarce.models.field import compose, fold_fraction, translation, warp  # noqa: E402
from scarce.segment.evaluate import evaluate_folders  # noqa: E402
from scarce.segment.predict import predict_files, predict_image  # noqa: E402
from scarce.segment.task import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def train_detector(work: Path, minutes: float) -> tuple[Path, dict]:
    """Train the defect detector on synthetic defects of isbi2012/unlabeled; test IoU."""
    data = work / "defects_data"
    shutil.rmtree(data, ignore_errors=True)  # this benchmark's own folder from an earlier run
    made = make_defect_dataset(DATA / "unlabeled", data, per_slice=3, seed=0)
    split = every_nth_split(made["images"])
    ingest(made["images"], made["masks"], data / "db", split=split, progress=False)
    cfg = override(load_config("em-defects"), {"max_minutes": minutes})
    run = work / "detector"
    train(data / "db" / "train.lmdb", data / "db" / "test.lmdb", run, cfg, overwrite=True)
    test = work / "defects_test"
    for sub in ("images", "masks"):
        (test / sub).mkdir(parents=True, exist_ok=True)
        for stem in split["test"]:
            link = test / sub / f"{stem}.tif"
            if not link.exists():
                link.symlink_to((Path(made[sub]) / f"{stem}.tif").resolve())
    predict_files(run, test / "images", test / "pred", progress=False)
    metrics = evaluate_folders(test / "pred", test / "masks", num_classes=4)
    names = ("normal", "crack", "fold", "missing")
    return run, {names[c["class"]]: c["iou"] for c in metrics["per_class"]}


def damaged_stack(work: Path, detector: Path) -> dict:
    """unlabeled/ with a synthetic defect on every other section: the stack and its masks."""
    rng = np.random.default_rng(1)
    slices = [s.astype(np.float32) for s in load_slices(DATA / "unlabeled")]
    true = np.zeros((len(slices), *slices[0].shape), np.uint8)
    for z in range(1, len(slices), 2):
        d = random_defect(slices[z], rng)
        slices[z], true[z] = d.image, d.mask
    stack = np.stack(slices)
    model, ckpt = load_model(detector)
    predicted = np.stack([predict_image(model, s[None], ckpt).argmax(0).numpy() for s in stack])
    paths = {
        "stack": work / "damaged.tif",
        "true": work / "true_masks.tif",
        "model": work / "model_masks.tif",
    }
    tifffile.imwrite(paths["stack"], stack, photometric="minisblack")
    tifffile.imwrite(paths["true"], true, photometric="minisblack")
    tifffile.imwrite(paths["model"], predicted.astype(np.uint8), photometric="minisblack")
    return paths


def train_aligner(
    work: Path, name: str, stack, masks, minutes: float, base: AlignConfig, init_from=None, steps=0
) -> Path:
    """Train an aligner on ``stack`` (with ``masks``): from scratch for ``minutes``, or, with
    ``init_from`` and ``steps``, fine-tuned from that run for ``steps`` steps (the levels
    reopened coarse to fine in three equal stages)."""
    db = work / f"db_{name}"
    ingest_stack(stack, db, test_slices="26:30", masks=masks, overwrite=True)
    if init_from is not None and steps:
        settings = {"max_steps": steps, "max_minutes": None, "test_every_n_steps": steps}
        settings["stage.stage_steps"] = max(1, steps // 3)
        cfg = override(base, settings)
    else:
        cfg = override(base, {"max_minutes": minutes})
    run = work / f"aligner_{name}"
    align_train(db / "train.lmdb", db / "test.lmdb", run, cfg, overwrite=True, init_from=init_from)
    return run


def pair_errors(run: Path, slices, mask_source, detector, pairs: int) -> dict:
    """Composition error away from defects and folds on damaged pairs of images/."""
    net, ckpt = load_model(run)
    cfg = config_from_dict(ckpt["config"], AlignConfig)
    model = load_model(detector) if mask_source == "model" else None
    rng = np.random.default_rng(2)
    zs = sorted(rng.choice(np.arange(1, len(slices)), size=pairs, replace=False).tolist())
    errors, folds = [], []
    for k, z in enumerate(zs):
        h, w = slices[z].shape
        u = random_deformation((h, w), 8.0, np.random.default_rng([3, k]))
        deformed = warp(torch.from_numpy(slices[z])[None, None], u)[0, 0].numpy()
        maker = (crack, fold)[k % 2]
        d = maker(deformed, np.random.default_rng([4, k]))
        source, target = d.image, slices[z - 1]
        c = rigid_offset(slices[z - 1], slices[z])
        truth = compose(torch.from_numpy(d.field)[None], u + translation(*c, h, w))
        masks = {"true": d.mask, "model": None, None: None}
        if mask_source == "model":
            masks["model"] = predict_image(model[0], source[None], model[1]).argmax(0).numpy()
        mask = masks.get(mask_source)
        usable = {} if mask is None else {"valid_s": mask == 0, "valid_t": np.ones_like(mask)}
        field = network_field(net, source, target, tile_size=1024, device="cpu", **usable)
        s, t = (torch.from_numpy(a.astype(np.float32))[None, None] for a in (source, target))
        ones = torch.ones_like(s)
        ms = None if mask is None else torch.from_numpy(mask.astype(np.float32))[None, None]
        settings = FineTune(30, cfg.loss.lambda_smooth, cfg.loss.smoothness)
        field = fine_tune(field, s, t, ones, ones, settings, ms, None if ms is None else ms * 0)
        band = (
            torch.nn.functional.max_pool2d(
                torch.from_numpy((d.mask > 0).astype(np.float32))[None, None], 33, 1, 16
            )[0, 0]
            > 0
        )
        margin = int(np.ceil(8 + np.hypot(*c) + 32)) + 8
        keep = ~band
        keep[:margin], keep[-margin:], keep[:, :margin], keep[:, -margin:] = (
            False,
            False,
            False,
            False,
        )
        err = composition_error(field, truth)[0]
        errors.append(float(err[keep].mean()))
        folds.append(fold_fraction(field))
    return {"error_px": float(np.mean(errors)), "folds": float(np.mean(folds)), "pairs": pairs}


def stack_part(work: Path, run: Path, slices) -> dict:
    """Errors against z with/without voting and drift decay; parallel vs sequential fields."""
    rigid = [slices[0]]
    shift = np.zeros(2)
    for z in range(1, len(slices)):
        # slice z ~ warp(its content in slice 0's frame, C_z), C_z the summed offsets
        shift += rigid_offset(slices[z - 1], slices[z])
        undo = translation(-shift[0], -shift[1], *slices[z].shape)
        rigid.append(warp(torch.from_numpy(slices[z])[None, None], undo)[0, 0].numpy())
    truths = [
        random_deformation(slices[0].shape, 6.0, np.random.default_rng([5, z]))
        for z in range(len(slices))
    ]
    stack = np.stack(
        [warp(torch.from_numpy(r)[None, None], u)[0, 0].numpy() for r, u in zip(rigid, truths)]
    )
    stack[10] = 0.0
    stack[20] = fold(stack[20], np.random.default_rng(6)).image
    tifffile.imwrite(work / "stack.tif", stack, photometric="minisblack")
    out = {}
    for name, options in {
        "vote1": {"vote": 1},
        "vote3": {"vote": 3},
        "vote3+decay": {"vote": 3, "drift_decay": 0.05},
    }.items():
        start = time.perf_counter()
        align_stack(
            run, work / "stack.tif", work / name, missing_value=0.0, progress=False, **options
        )
        fields = tifffile.imread(work / name / "fields.tif")
        errs = []
        for z in range(len(stack)):
            d = torch.from_numpy(fields[z])[None]
            err = (compose(d, truths[z]) - truths[0]).norm(dim=1)[0, 48:-48, 48:-48]
            errs.append(float(err.mean()))
        out[name] = {
            "error_vs_z": errs,
            "drift_px": errs[-1],
            "mean_px": float(np.mean([e for z, e in enumerate(errs) if z not in (10, 20)])),
            "seconds": time.perf_counter() - start,
        }
    align_stack(
        run,
        work / "stack.tif",
        work / "parallel",
        missing_value=0.0,
        progress=False,
        vote=3,
        workers=2,
    )
    a = tifffile.imread(work / "vote3" / "fields.tif")
    b = tifffile.imread(work / "parallel" / "fields.tif")
    out["parallel_max_difference_px"] = float(np.abs(a - b).max())
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Alignment through defects (`benchmarks/align_defects.py`)",
        "",
        f"Command: `{result['command']}`; {result['date']}; wall {result['wall_s']:.0f} s",
        "",
        "## Defect detector (synthetic defects, held-out test images)",
        "",
        "| class | IoU |",
        "|---|---|",
    ]
    lines += [
        f"| {k} | {v if v is None else round(v, 3)} |" for k, v in result["detector_iou"].items()
    ]
    lines += [
        "",
        "## Pairs with cracks and folds (error away from defects)",
        "",
        "| aligner | composition error px | folds % |",
        "|---|---|---|",
    ]
    for name, r in result["pairs"].items():
        lines.append(f"| {name} | {r['error_px']:.2f} | {100 * r['folds']:.3f} |")
    s = result["stack"]
    lines += [
        "",
        "## A 30-slice stack (slice 10 blank, slice 20 folded)",
        "",
        "| run | mean error px | drift (last slice) px | s |",
        "|---|---|---|---|",
    ]
    for name in ("vote1", "vote3", "vote3+decay"):
        lines.append(
            f"| {name} | {s[name]['mean_px']:.2f} | {s[name]['drift_px']:.2f} | "
            f"{s[name]['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Parallel (2 workers) vs sequential fields: largest difference "
        f"{s['parallel_max_difference_px']:.2e} px.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="budget per trained model")
    parser.add_argument("--plain", help="an aligner run never trained on defects (align.py's)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "align_defects"))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="with --plain: fine-tune the defect aligners from it for this many steps",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    detector, iou = train_detector(work, args.minutes)
    paths = damaged_stack(work, detector)
    base = load_config("align-em", AlignConfig)
    tune = {"init_from": args.plain, "steps": args.finetune_steps} if args.plain else {}
    runs = {
        name: train_aligner(work, name, paths["stack"], masks, args.minutes, base, **tune)
        for name, masks in (("nomask", None), ("model", paths["model"]), ("true", paths["true"]))
    }
    runs["plain"] = (
        Path(args.plain)
        if args.plain
        else train_aligner(work, "plain", DATA / "unlabeled", None, args.minutes, base)
    )
    slices = load_slices(DATA / "images")
    sources = {"nomask": None, "model": "model", "true": "true", "plain": None}
    pairs = {
        name: pair_errors(run, slices, sources[name], detector, args.pairs)
        for name, run in runs.items()
    }
    pairs["plain+model"] = pair_errors(runs["plain"], slices, "model", detector, args.pairs)
    result = {
        "command": "benchmarks/align_defects.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "detector_iou": iou,
        "pairs": pairs,
        "stack": stack_part(work, runs["true"], slices),
        "wall_s": time.perf_counter() - start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "align_defects.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "align_defects.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
