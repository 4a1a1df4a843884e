"""The planning verbs: ``scarce plan`` and ``scarce learning-curve``, and the planning step
of ``scarce train --max-minutes`` without ``--config``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from scarce.cli.common import db_paths, run_config

logger = logging.getLogger("scarce")


def _add_budget_flags(p) -> None:
    from scarce.config import AMP_MODES  # light: no torch

    p.add_argument("--train-db", required=True)
    p.add_argument("--test-db", help="test database (default: beside --train-db if present)")
    p.add_argument("--config", help="recipe to size (default: a preset for the masks' kind)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=AMP_MODES, help="plan this precision (off: float32)")
    p.add_argument("--seed", type=int)


def add_verbs(sub) -> None:
    """Add ``plan`` and ``learning-curve`` to the ``scarce`` sub-command parser."""
    p = sub.add_parser("plan", help="size a training run to this machine and a time budget")
    _add_budget_flags(p)
    p.add_argument("--minutes", type=float, default=8.0, help="budget of the whole run")
    p.add_argument("--out", default="plan.yaml", help="config to write (and OUT.json)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p = sub.add_parser(
        "learning-curve", help="train on nested subsets: would more annotations help?"
    )
    _add_budget_flags(p)
    p.add_argument("--out", required=True, help="folder for the runs, curve.csv and curve.png")
    p.add_argument("--fractions", default="0.25,0.5,1", help="shares of the training images")
    p.add_argument("--minutes", type=float, default=8.0, help="budget of each run")
    p.add_argument("--overwrite", action="store_true")


def cmd_plan(args) -> int:
    """``scarce plan``: print the plan, write the config and the JSON report."""
    from scarce.config import load_config
    from scarce.segment.plan import format_plan, plan_run, write_plan

    train_db, test_db = db_paths(args)
    cfg = load_config(args.config) if args.config else None
    plan = plan_run(
        train_db,
        test_db,
        minutes=args.minutes,
        cfg=cfg,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
    )
    config, report = write_plan(plan, args.out)
    print(json.dumps(plan.to_dict(), indent=1, default=str) if args.json else format_plan(plan))
    print(
        f"wrote {config} (train with: scarce train --config {config} --train-db {train_db} "
        f"--out RUN) and {report}"
    )
    return 0


def train_config(args, cls):
    """The config of ``scarce train``, planned first when ``--max-minutes`` comes alone.

    Without ``--config`` and with ``--max-minutes`` (and not resuming, one process), the run
    is planned in that budget (the planning's own time counted) and the other flags apply on
    top of the plan. With ``--config`` and ``--max-minutes``, a warning says when the config
    is predicted to take far longer. Returns ``(cfg, plan or None)``.
    """
    from scarce.config import override
    from scarce.segment.plan import budget_warning, format_plan, plan_run

    minutes = getattr(args, "max_minutes", None)
    distributed = args.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not minutes or args.resume or distributed:
        return run_config(args, cls), None
    train_db, test_db = db_paths(args)
    if args.config is not None:
        cfg = run_config(args, cls)
        warning = budget_warning(cfg, train_db, test_db)
        if warning:
            logger.warning("--config %s: %s", args.config, warning)
        return cfg, None
    import psutil

    plan = plan_run(
        train_db,
        test_db,
        minutes=minutes,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        count_planning=True,
        spent_seconds=time.time() - psutil.Process().create_time(),  # start-up counts too
    )
    logger.info(
        "No --config: planned the run for --max-minutes %g first\n%s", minutes, format_plan(plan)
    )
    cfg = run_config(args, cls, base=plan.config)
    return override(cfg, {"max_minutes": plan.config.max_minutes}), plan


def record_plan(plan, run_dir, summary: dict, wall_seconds: float) -> Path:
    """Write ``RUN/plan.json``: the plan, and what the run then measured."""
    from scarce.atomic import write_text

    out = plan.to_dict()
    out["measured"] = {
        "wall_seconds": round(wall_seconds, 1),
        "trainer_wall_seconds": summary.get("wall_time_s"),
        "steps": summary.get("steps"),
        "stop_reason": summary.get("stop_reason"),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "oom_fallback": summary.get("oom_fallback"),
    }
    path = Path(run_dir) / "plan.json"
    write_text(path, json.dumps(out, indent=1, default=str) + "\n")
    return path


def cmd_learning_curve(args) -> int:
    """``scarce learning-curve``."""
    from scarce.config import load_config
    from scarce.segment.curve import format_curve, learning_curve

    train_db, test_db = db_paths(args)
    if test_db is None:
        from scarce.errors import MissingInputError

        raise MissingInputError(
            f"no test database beside {train_db}; pass --test-db (the curve needs a test set)"
        )
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    start = time.perf_counter()
    result = learning_curve(
        train_db,
        test_db,
        args.out,
        fractions=fractions,
        minutes=args.minutes,
        cfg=load_config(args.config) if args.config else None,
        device=args.device,
        amp=args.amp,
        seed=args.seed if args.seed is not None else 0,
        overwrite=args.overwrite,
    )
    print(format_curve(result))
    print(f"({(time.perf_counter() - start) / 60:.1f} min) table, plot and runs in {args.out}")
    return 0


COMMANDS = {"plan": cmd_plan, "learning-curve": cmd_learning_curve}
