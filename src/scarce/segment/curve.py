"""``scarce learning-curve``: would more annotations help?

The training images are shuffled once with the seed and cut into nested subsets (the first
25 %, 50 %, 100 % of one order: every subset holds the smaller ones). One plan is made for the
whole training set (:func:`scarce.segment.plan.plan_run`) and every subset trains with that
same config (same steps, patch, model) and is scored on the same test database: pooled
foreground Dice and, for instance masks, object F1 at IoU 0.5 (:func:`score_checkpoint`, the
last weights, no selection on the test set). The curve is *still rising* when the last
doubling of the images gained at least ``RISING`` (0.01) Dice or F1 per doubling.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from scarce.data.install import check_output_folder
from scarce.data.store import SampleStore, read_metadata
from scarce.data.subset import subset_database
from scarce.engine.checkpoint import load_model
from scarce.engine.distributed import resolve_device
from scarce.errors import InputError
from scarce.segment.evaluate import evaluate_arrays
from scarce.segment.plan import plan_run, write_plan
from scarce.segment.predict import instance_options, instances_from_prediction, predict_image
from scarce.segment.task import target_of, train

logger = logging.getLogger("scarce")

RISING = 0.01  # gain per doubling of the training images that counts as "still rising"


def nested_subsets(sources, fractions, seed: int) -> dict[float, list[str]]:
    """Nested, seeded subsets of source stems: ``{fraction: stems}``.

    The stems are sorted, shuffled once with ``numpy.random.default_rng(seed)``, and the
    subset of fraction q is the first ``max(1, ceil(q * n))`` of that order, so a smaller
    subset is always part of a larger one and the same seed gives the same subsets.

    Raises
    ------
    InputError
        If a fraction is outside (0, 1] or there are no sources.
    """
    stems = sorted(sources)
    bad = [q for q in fractions if not 0 < q <= 1]
    if bad or not stems or not fractions:
        raise InputError(
            f"fractions must be in (0, 1] and the database must hold images; got "
            f"{list(fractions)} for {len(stems)} source image(s)"
        )
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    return {q: order[: max(1, math.ceil(q * len(stems)))] for q in sorted(set(fractions))}


def score_checkpoint(checkpoint, test_db, *, device="auto") -> dict:
    """Pooled foreground Dice (and object F1@0.5 for instance masks) of a model on a database.

    Every test sample is predicted whole (:func:`~scarce.segment.predict.predict_image`, the
    checkpoint's scale and normalisation) and scored by
    :func:`~scarce.segment.evaluate.evaluate_arrays` against its stored mask, as
    ``benchmarks/accuracy.py`` does.

    Returns
    -------
    dict
        ``fg_dice`` (foreground classes' mean Dice from one pooled confusion matrix),
        ``object_f1`` (instance masks, else None), ``test_images``.
    """
    model, ckpt = load_model(checkpoint, resolve_device(device))
    meta = read_metadata(test_db)
    instances = meta["mask_kind"] == "instance"
    rule = target_of(ckpt).rule
    pairs = []
    with SampleStore(test_db) as store:
        for i in range(len(store)):
            sample = store[i]
            probs = predict_image(model, sample.image, ckpt)
            pred = (
                instances_from_prediction(probs, rule, **instance_options(ckpt))
                if instances
                else probs.argmax(0).numpy()
            )
            pairs.append((sample.name, sample.mask, pred))
    metrics, _ = evaluate_arrays(
        pairs,
        num_classes=None if instances else int(model.num_classes),
        instances=instances,
        ignore_label=meta.get("ignore_label"),
        truth_kind="instances" if instances else "classes",
        pred_kind="instances" if instances else "classes",
    )
    f1 = metrics["objects"]["0.50"]["f1"] if instances else None
    return {"fg_dice": metrics["mean_dice"], "object_f1": f1, "test_images": len(pairs)}


def verdict(rows: list[dict], key: str) -> dict:
    """Whether ``key`` still rises: its gain per doubling of images over the last step.

    Returns
    -------
    dict
        ``rising`` (bool or None with fewer than two points), ``gain_per_doubling``,
        ``message``.
    """
    points = [(r["images"], r[key]) for r in rows if r.get(key) is not None]
    if len(points) < 2 or points[-1][0] <= points[-2][0]:
        return {"rising": None, "gain_per_doubling": None, "message": "one point: no trend"}
    (n0, m0), (n1, m1) = points[-2], points[-1]
    gain = (m1 - m0) / math.log2(n1 / n0)
    rising = gain >= RISING
    advice = (
        "more annotations are likely to help"
        if rising
        else "more annotations are unlikely to help much at this budget (a longer run or a "
        "larger model may)"
    )
    message = (
        f"{'still rising' if rising else 'flat'}: {gain:+.3f} {key} per doubling of the "
        f"training images ({n0} -> {n1}); {advice}"
    )
    return {"rising": rising, "gain_per_doubling": gain, "message": message}


def learning_curve(
    train_db,
    test_db,
    out_dir,
    *,
    fractions=(0.25, 0.5, 1.0),
    minutes: float = 8.0,
    cfg=None,
    device=None,
    amp=None,
    seed: int = 0,
    overwrite: bool = False,
    trainer=train,
    machine=None,
) -> dict:
    """Train on nested subsets of the training images and score each on the test set.

    Parameters
    ----------
    train_db, test_db : path-like
        Databases written by ``scarce ingest``.
    out_dir : path-like
        Created: ``plan.yaml``/``plan.json`` (the one plan), ``data/n<images>/train.lmdb``,
        ``runs/n<images>/`` (ordinary run folders), ``curve.csv``, ``curve.json``, ``curve.png``.
    fractions : sequence of float
        Shares of the training images, in (0, 1].
    minutes : float
        The budget each run is planned for, minutes.
    cfg : TrainConfig, optional
        The recipe to plan (default: the preset for the masks' kind).
    device, amp : str, optional
        As for :func:`scarce.segment.plan.plan_run`.
    seed : int
        Seeds the subsets and every run.
    overwrite : bool
        Replace an existing ``out_dir``.
    trainer : callable
        ``trainer(train_db, test_db, run_dir, cfg, overwrite=True) -> summary`` (tests pass a
        shorter one).
    machine : scarce.segment.machine.Machine, optional
        What the plan measures (default: this machine).

    Returns
    -------
    dict
        ``rows`` (``fraction``, ``images``, ``samples``, ``steps``, ``wall_seconds``,
        ``fg_dice``, ``object_f1``), ``verdict`` (of object F1 for instance masks, else of
        foreground Dice), ``plan_seconds``.

    Raises
    ------
    scarce.errors.OutputExistsError
        If ``out_dir`` exists and ``overwrite`` is false.
    InputError
        For bad fractions.
    """
    out = Path(out_dir)
    check_output_folder(out, overwrite=overwrite)
    meta = read_metadata(train_db)
    subsets = nested_subsets(meta["sources"], fractions, seed)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_run(
        train_db,
        test_db,
        minutes=minutes,
        cfg=cfg,
        device=device,
        amp=amp,
        seed=seed,
        machine=machine,
    )
    write_plan(plan, out / "plan.yaml")
    rows = []
    for q, stems in subsets.items():
        tag = f"n{len(stems)}"
        db = Path(train_db)
        if len(stems) < len(meta["sources"]):
            db = out / "data" / tag / "train.lmdb"
            subset_database(train_db, db, stems, overwrite=True)
        logger.info(
            "learning curve: %d of %d training images (%s)", len(stems), len(meta["sources"]), tag
        )
        summary = trainer(db, test_db, out / "runs" / tag, plan.config, overwrite=True)
        score = score_checkpoint(out / "runs" / tag / "checkpoints" / "last.pt", test_db)
        rows.append(
            {
                "fraction": q,
                "images": len(stems),
                "samples": read_metadata(db)["num_samples"],
                "steps": summary["steps"],
                "wall_seconds": summary["wall_time_s"],
                **{k: score[k] for k in ("fg_dice", "object_f1")},
            }
        )
    key = "object_f1" if meta["mask_kind"] == "instance" else "fg_dice"
    result = {"rows": rows, "verdict": verdict(rows, key), "plan_seconds": plan.seconds}
    _write_curve(out, result, key)
    return result


def _write_curve(out: Path, result: dict, key: str) -> None:
    """``curve.csv``, ``curve.json`` and ``curve.png`` (metric against training images)."""
    rows = result["rows"]
    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("fg_dice", "object_f1"):
        if all(r[name] is not None for r in rows):
            ax.plot([r["images"] for r in rows], [r[name] for r in rows], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images")
    ax.set_ylabel("test score")
    ax.set_title(result["verdict"]["message"].split(":")[0], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)


def format_curve(result: dict) -> str:
    """The curve as a table plus the verdict."""
    lines = ["images | samples | steps | wall s | fg Dice | object F1"]
    for r in result["rows"]:
        f1 = "-" if r["object_f1"] is None else f"{r['object_f1']:.4f}"
        lines.append(
            f"{r['images']:>6} | {r['samples']:>7} | {r['steps']:>5} | {r['wall_seconds']:>6.0f} | "
            f"{r['fg_dice']:.4f}  | {f1}"
        )
    return "\n".join([*lines, result["verdict"]["message"]])


__all__ = ["learning_curve", "nested_subsets", "score_checkpoint", "verdict"]
