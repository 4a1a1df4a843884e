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

    p = sub.add_parser("align-evaluate", help="CPC, folds and composition error of an alignment")
    p.add_argument("--stack", required=True, help="the aligned stack, e.g. OUT/aligned.tif")
    p.add_argument("--fields", help="OUT/fields.tif")
    p.add_argument("--truth-fields", help="(Z, 2, H, W) known deformations of the slices")
    p.add_argument("--before", help="the unaligned stack (CPC before, before overlays)")
    p.add_argument("--chunk", type=int, default=64, help="CPC block side, pixels")
    p.add_argument("--missing-value", type=float)
    p.add_argument("--out", help="report folder (metrics.json, PNGs)")


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
        db = Path(args.out) / "db"
        first_test = max(2, count - max(2, count // 5))
        ingest_stack(args.stack, db, test_slices=f"{first_test}:", overwrite=True)
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
        tile_size=args.tile_size,
        device=args.device,
        save_encodings=args.save_encodings,
    )
    rows = report["pairs"]
    before = [r["cpc_before"] for r in rows if r["cpc_before"] is not None]
    after = [r["cpc_after"] for r in rows if r["cpc_after"] is not None]
    print(
        f"aligned {len(rows) + 1} slices into {args.out} in {report['seconds']:.1f} s; "
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


COMMANDS = {
    "ingest-stack": cmd_ingest_stack,
    "align-train": cmd_align_train,
    "align": cmd_align,
    "align-evaluate": cmd_align_evaluate,
}
