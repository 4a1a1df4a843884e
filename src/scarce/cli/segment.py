"""The segmentation verbs: ingest, inspect, train, predict, evaluate, export, demo,
benchmark-readers. Each parses its flags, calls one library function and prints a short result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scarce.cli.common import (
    add_run_flags,
    db_paths,
    finish_run,
    relaunch_under_torchrun,
)


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="folders of images + masks -> LMDB train/test databases")
    p.add_argument("--images", required=True, help="folder of images (TIFF, PNG, JPEG)")
    p.add_argument("--masks", required=True, help="folder of masks with the same file stems")
    p.add_argument("--out", required=True, help="database folder to create (DB_DIR)")
    p.add_argument("--train-fraction", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", help='split.json to reuse: {"train": [stems], "test": [stems]}')
    p.add_argument("--tile-size", type=int, help="cut images into tiles of this side, pixels")
    p.add_argument("--tile-stride", type=int, help="tile stride, pixels (default: tile size)")
    p.add_argument(
        "--mask-kind",
        choices=("class", "instance"),
        help="default: mask_kind in dataset.yaml, else class",
    )
    p.add_argument("--metadata", help="dataset.yaml (default: IMAGES/dataset.yaml if present)")
    p.add_argument("--channel-axis", type=int, choices=(0, -1), help="channel axis of 3D files")
    p.add_argument(
        "--num-classes",
        type=int,
        help="confirm the class count of class masks (needed for class ids above 255)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DB_DIR")
    p.add_argument(
        "--label-map",
        help="mask values -> classes: 'ilastik' (0 -> ignore, k -> k-1) or '0:ignore,1:0,2:1'",
    )


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a U-Net/SegNet on LMDB databases")
    add_run_flags(p, default_config=None)
    p.add_argument("--model", dest="model.name")
    p.add_argument("--batch-size", type=int, dest="data.batch_size")
    p.add_argument("--patch-size", type=int, dest="data.patch_size")
    p.add_argument(
        "--balance-classes", action="store_const", const=True, dest="data.balance_classes"
    )
    p.add_argument("--no-augment", action="store_const", const=False, dest="augment.enabled")


def _add_predict(sub) -> None:
    from scarce.config import CHOICES  # light: no torch

    p = sub.add_parser("predict", help="segment images with a trained model")
    p.add_argument("--model", required=True, help="run folder or checkpoint file")
    p.add_argument("--images", required=True, help="folder of images or one image file")
    p.add_argument("--out", required=True)
    p.add_argument("--tile-size", type=int)
    p.add_argument("--overlap", type=float)
    p.add_argument("--blend", choices=CHOICES["predict.blend"])
    p.add_argument("--tta", action="store_const", const=True)
    p.add_argument("--probabilities", action="store_true", help="also write <stem>_prob.tif")
    p.add_argument("--instances", action="store_true", help="also write <stem>_instances.tif")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--format", choices=("tif", "png"), default="tif")
    p.add_argument(
        "--pixel-size-um",
        type=float,
        help="pixel size recorded in the outputs (default: the checkpoint's)",
    )
    p.add_argument(
        "--dask-scheduler", metavar="ADDRESS", help="run on this dask.distributed scheduler"
    )
    p.add_argument("--workers", type=int, help="run on a local Dask cluster of N processes")
    p.add_argument(
        "--chunk-size", type=int, default=2048, help="block side for .zarr images, pixels"
    )


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="pixel and object metrics of predictions vs truth")
    p.add_argument("--pred", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--out", help="report folder (metrics.json, per_image.csv)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--instances", action="store_true")
    p.add_argument("--iou-thresholds", help="comma-separated, default 0.5,0.55,...,0.95")
    p.add_argument("--ignore-label", type=int)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model: TorchScript, ONNX or a bioimage.io zip")
    p.add_argument("--model", required=True)
    p.add_argument("--format", choices=("torchscript", "onnx", "bioimageio"), required=True)
    p.add_argument("--out", required=True)
    g = p.add_argument_group("bioimageio (default: dataset.yaml of the training data)")
    g.add_argument("--test-image", help="image for the test tensors (default: a test image)")
    g.add_argument("--name")
    g.add_argument("--description")
    g.add_argument("--author", action="append", help="author name (repeat for several)")
    g.add_argument("--license", help="SPDX licence id (default CC-BY-4.0)")
    g.add_argument("--cite", action="append", help="citation text (repeat; pair with --doi)")
    g.add_argument("--doi", action="append", help="DOI of the --cite at the same position")


def add_verbs(sub) -> None:
    """Add the segmentation verbs to the ``scarce`` sub-command parser."""
    _add_ingest(sub)
    p = sub.add_parser("inspect", help="summarise a database")
    p.add_argument("path", help="DB_DIR or one .lmdb folder")
    p.add_argument("--json", action="store_true")
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_export(sub)
    p = sub.add_parser("demo", help="ingest, train, predict and evaluate on a real dataset")
    p.add_argument(
        "--data", default="../shared/data/nist_rpe", help="folder with images/ and masks/"
    )
    p.add_argument("--out", default="demo-out")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--config", help="preset name or YAML file (default: the quick-cpu preset)")
    p = sub.add_parser("benchmark-readers", help="augmented patches per second")
    p.add_argument("db", help="DB_DIR or .lmdb")
    p.add_argument("--config")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--reader-count", type=int)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--json", action="store_true")


def cmd_train(args) -> int:
    """``scarce train``: resolve the config, then train (or torchrun for --nproc)."""
    code = relaunch_under_torchrun(args)
    if code is not None:
        return code
    from scarce.cli.plan import record_plan, train_config
    from scarce.config import TrainConfig
    from scarce.segment.task import train

    train_db, test_db = db_paths(args)
    cfg, plan = train_config(args, TrainConfig)
    start = time.perf_counter()
    summary = train(
        train_db,
        test_db,
        args.out,
        cfg,
        resume=args.resume,
        init_from=args.init_from,
        overwrite=args.overwrite,
    )
    if plan is not None:
        record_plan(plan, args.out, summary, time.perf_counter() - start)
    return finish_run(args, summary)


def cmd_ingest(args) -> int:
    """``scarce ingest``."""
    from scarce.data.ingest import ingest
    from scarce.data.inspect import format_inspection, inspect_database

    ingest(
        args.images,
        args.masks,
        args.out,
        train_fraction=args.train_fraction,
        seed=args.seed,
        split=args.split,
        tile_size=args.tile_size,
        tile_stride=args.tile_stride,
        mask_kind=args.mask_kind,
        metadata=args.metadata,
        overwrite=args.overwrite,
        channel_axis=args.channel_axis,
        num_classes=args.num_classes,
        label_map=args.label_map,
    )
    print(format_inspection(inspect_database(args.out)))
    return 0


def cmd_inspect(args) -> int:
    """``scarce inspect``."""
    from scarce.data.inspect import format_inspection, inspect_database

    info = inspect_database(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_predict(args) -> int:
    """``scarce predict``."""
    from scarce.segment.scaleout import predict_any

    written = predict_any(
        args.model,
        args.images,
        args.out,
        scheduler=args.dask_scheduler,
        workers=args.workers,
        chunk=args.chunk_size,
        tile_size=args.tile_size,
        overlap=args.overlap,
        blend=args.blend,
        tta=args.tta,
        probabilities=args.probabilities,
        instances=args.instances,
        batch_size=args.batch_size,
        device=args.device,
        fmt=args.format,
        pixel_size_um=args.pixel_size_um,
    )
    print(f"wrote predictions for {len(written)} image(s) into {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    """``scarce evaluate``."""
    from scarce.segment.evaluate import evaluate_folders, format_summary
    from scarce.segment.metrics import DEFAULT_THRESHOLDS

    thresholds = DEFAULT_THRESHOLDS
    if args.iou_thresholds:
        thresholds = tuple(float(t) for t in args.iou_thresholds.split(","))
    metrics = evaluate_folders(
        args.pred,
        args.truth,
        args.out,
        num_classes=args.num_classes,
        instances=args.instances,
        iou_thresholds=thresholds,
        ignore_label=args.ignore_label,
    )
    print(format_summary(metrics))
    if args.out:
        print(f"report: {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'per_image.csv'}")
    return 0


def cmd_export(args) -> int:
    """``scarce export``."""
    if args.format == "bioimageio":
        from scarce.segment.bioimageio import export_bioimageio

        dois = args.doi or []
        cite = [
            {"text": t, **({"doi": dois[i]} if i < len(dois) else {})}
            for i, t in enumerate(args.cite or [])
        ]
        out = export_bioimageio(
            args.model,
            args.out,
            test_image=args.test_image,
            name=args.name,
            description=args.description,
            authors=args.author,
            license_id=args.license,
            cite=cite or None,
        )
        print(f"wrote bioimage.io package {out} (passes bioimageio test)")
        return 0
    from scarce.segment.export import export_model

    out = export_model(args.model, args.format, args.out)
    print(f"exported {args.format} model to {out} (metadata: {out}.json)")
    return 0


def cmd_demo(args) -> int:
    """``scarce demo``."""
    from scarce.demo import run_demo

    run_demo(args.data, args.out, minutes=args.minutes, config=args.config)
    return 0


def cmd_benchmark_readers(args) -> int:
    """``scarce benchmark-readers``."""
    from scarce.config import load_config, override
    from scarce.data.monitor import format_benchmark
    from scarce.segment.readers import benchmark_readers

    cfg = load_config(args.config)
    values = {"data.patch_size": args.patch_size, "data.batch_size": args.batch_size}
    cfg = override(cfg, {k: v for k, v in values.items() if v is not None})
    db = Path(args.db)
    if (db / "train.lmdb").is_dir():
        db = db / "train.lmdb"
    result = benchmark_readers(db, cfg, seconds=args.seconds, reader_count=args.reader_count)
    print(json.dumps(result, indent=2) if args.json else format_benchmark(result))
    return 0


COMMANDS = {
    "ingest": cmd_ingest,
    "inspect": cmd_inspect,
    "train": cmd_train,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "demo": cmd_demo,
    "benchmark-readers": cmd_benchmark_readers,
}
