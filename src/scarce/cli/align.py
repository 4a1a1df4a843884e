"""The alignment verbs: ingest-stack, align-train, align, align-evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from scarce.cli.common import (
    add_run_flags,
    db_paths,
    finish_run,
    relaunch_under_torchrun,
    run_config,
)


def add_verbs(sub) -> None:
    """Add the alignment verbs to the ``scarce`` sub-command parser."""
    p = sub.add_parser("ingest-stack", help="serial-section stacks -> LMDB for the aligner")
    p.add_argument(
        "--stack",
        action="append",
        required=True,
        help="multi-page TIFF, folder of images, .zarr or .h5[:dataset]; repeatable",
    )
    p.add_argument("--out", required=True, help="database folder to create (DB)")
    p.add_argument("--test-slices", help="slices held out for testing, e.g. 24:30")
    p.add_argument("--missing-value", type=float, help="pixels equal to this are missing data")
    p.add_argument("--masks", action="append", help="defect-mask stack per --stack")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("align-train", help="train a SEAMLeSS-style aligner on a stack database")
    add_run_flags(p, default_config="align-em")
    p.add_argument("--batch-size", type=int, dest="data.batch_size")
    p.add_argument("--patch-size", type=int, dest="data.patch_size")
    p.add_argument(
        "--stack",
        help="convenience: ingest this stack into RUN/db first "
        "(then --train-db may be omitted; last 20 %% of slices test)",
    )
    _add_mask_flags(p)

    p = sub.add_parser("align", help="align a stack with a trained aligner")
    p.add_argument("--model", required=True, help="run folder or checkpoint of align-train")
    p.add_argument("--stack", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reference", type=int, default=0, help="the slice that stays put")
    p.add_argument(
        "--fine-tune-steps", type=int, default=0, help="Adam steps per pair on the network's field"
    )
    p.add_argument("--missing-value", type=float)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--save-encodings",
        action="store_true",
        help="also write the encoder's feature maps of every slice",
    )
    p.add_argument(
        "--vote", type=int, default=1, help="neighbours per slice in the softmin vote (3: SEAMLeSS)"
    )
    p.add_argument(
        "--drift-decay",
        type=float,
        default=0.0,
        help="share of the slow (low-pass) part of each composed field removed per slice",
    )
    p.add_argument("--drift-sigma", type=float, default=64.0, help="low-pass std, pixels")
    p.add_argument(
        "--workers", type=int, default=1, help="processes computing pairwise fields in parallel"
    )
    _add_mask_flags(p)

    p = sub.add_parser("defects-train", help="train a defect detector on synthetic defects")
    p.add_argument("--stack", required=True)
    p.add_argument("--out", required=True, help="run folder (its data goes to OUT_data)")
    p.add_argument("--config", default="em-defects")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--per-slice", type=int, default=4, help="damaged copies per slice")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config value"
    )

    p = sub.add_parser("align-evaluate", help="CPC, folds and composition error of an alignment")
    p.add_argument("--stack", required=True, help="the aligned stack, e.g. OUT/aligned.tif")
    p.add_argument("--fields", help="OUT/fields.tif")
    p.add_argument("--truth-fields", help="(Z, 2, H, W) known deformations of the slices")
    p.add_argument("--before", help="the unaligned stack (CPC before, before overlays)")
    p.add_argument("--chunk", type=int, default=64, help="CPC block side, pixels")
    p.add_argument("--missing-value", type=float)
    p.add_argument("--out", help="report folder (metrics.json, PNGs)")


def _add_mask_flags(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--masks", help="defect-mask stack (0 normal, 1 crack, 2 fold, 3 missing)")
    group.add_argument("--defect-model", help="segmentation run that predicts defect masks")


def defect_masks(args, stack):
    """``(Z, H, W)`` uint8 masks from ``--masks`` or ``--defect-model``, or None."""
    import numpy as np

    from scarce.align.stack import open_stack

    if getattr(args, "masks", None):
        (st,) = open_stack(args.masks)[:1]
        return np.stack([st.slice(z) for z in range(len(st))]).astype(np.uint8)
    if not getattr(args, "defect_model", None):
        return None
    from scarce.engine.checkpoint import load_model
    from scarce.segment.predict import predict_image

    model, ckpt = load_model(args.defect_model)
    (st,) = open_stack(stack)[:1]
    return np.stack(
        [
            predict_image(model, st.slice(z)[None], ckpt).argmax(0).numpy().astype(np.uint8)
            for z in range(len(st))
        ]
    )


def cmd_ingest_stack(args) -> int:
    """``scarce ingest-stack``."""
    from scarce.align.stack import ingest_stack

    summary = ingest_stack(
        args.stack,
        args.out,
        test_slices=args.test_slices,
        missing_value=args.missing_value,
        masks=args.masks,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_align_train(args) -> int:
    """``scarce align-train``: optionally ingest ``--stack``, then train the aligner."""
    code = relaunch_under_torchrun(args)
    if code is not None:
        return code
    from scarce.align.config import AlignConfig
    from scarce.align.task import align_train

    if args.stack:
        from scarce.align.stack import ingest_stack, open_stack

        count = len(open_stack(args.stack)[0])
        db = Path(args.out).with_name(Path(args.out).name + "_db")
        first_test = max(2, count - max(2, count // 5))
        masks = defect_masks(args, args.stack)
        mask_stack = None
        if masks is not None:
            from scarce.io import write_tiff

            db.parent.mkdir(parents=True, exist_ok=True)
            mask_stack = db.with_name(db.name + "_masks.tif")
            write_tiff(mask_stack, masks, photometric="minisblack")
        ingest_stack(args.stack, db, test_slices=f"{first_test}:", masks=mask_stack, overwrite=True)
        args.train_db, args.test_db = str(db / "train.lmdb"), str(db / "test.lmdb")
    train_db, test_db = db_paths(args)
    summary = align_train(
        train_db,
        test_db,
        args.out,
        run_config(args, AlignConfig),
        resume=args.resume,
        init_from=args.init_from,
        overwrite=args.overwrite,
    )
    return finish_run(args, summary)


def cmd_align(args) -> int:
    """``scarce align``."""
    from scarce.align.apply import align_stack

    report = align_stack(
        args.model,
        args.stack,
        args.out,
        reference=args.reference,
        fine_tune_steps=args.fine_tune_steps,
        missing_value=args.missing_value,
        masks=defect_masks(args, args.stack),
        vote=args.vote,
        drift_decay=args.drift_decay,
        drift_sigma=args.drift_sigma,
        workers=args.workers,
        tile_size=args.tile_size,
        device=args.device,
        save_encodings=args.save_encodings,
    )
    rows = report["pairs"]
    before = [r["cpc_before"] for r in rows if r["cpc_before"] is not None]
    after = [r["cpc_after"] for r in rows if r["cpc_after"] is not None]
    print(
        f"aligned {len(rows) + 1} slices into {args.out} in {report['pair_seconds']:.1f} s; "
        f"mean CPC {sum(before) / max(len(before), 1):.3f} -> {sum(after) / max(len(after), 1):.3f}"
    )
    return 0


def cmd_align_evaluate(args) -> int:
    """``scarce align-evaluate``."""
    from scarce.align.evaluate import evaluate_stack

    result = evaluate_stack(
        args.stack,
        args.out,
        fields=args.fields,
        truth_fields=args.truth_fields,
        chunk=args.chunk,
        missing_value=args.missing_value,
        before=args.before,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "per_pair"}, indent=2))
    return 0


def cmd_defects_train(args) -> int:
    """``scarce defects-train``: synthetic defects on the stack -> ingest -> segmentation run."""
    from scarce.align.defects import make_defect_dataset
    from scarce.config import load_config, override
    from scarce.data.ingest import ingest
    from scarce.demo import every_nth_split
    from scarce.segment.task import train

    data = Path(args.out).with_name(Path(args.out).name + "_data")
    if data.exists() and args.overwrite:
        import shutil

        shutil.rmtree(data)
    made = make_defect_dataset(args.stack, data, per_slice=args.per_slice)
    split = every_nth_split(made["images"])
    ingest(made["images"], made["masks"], data / "db", split=split, progress=False)
    values = dict(item.partition("=")[::2] for item in args.set)
    if args.max_minutes:
        values["max_minutes"] = args.max_minutes
    cfg = override(load_config(args.config), values)
    summary = train(
        data / "db" / "train.lmdb",
        data / "db" / "test.lmdb",
        args.out,
        cfg,
        overwrite=args.overwrite,
    )
    print(
        f"defect model: {args.out} ({summary['steps']} steps, best mean Dice "
        f"{summary.get('best_mean_dice')}); data and database: {data}"
    )
    return 0


COMMANDS = {
    "ingest-stack": cmd_ingest_stack,
    "align-train": cmd_align_train,
    "align": cmd_align,
    "align-evaluate": cmd_align_evaluate,
    "defects-train": cmd_defects_train,
}
