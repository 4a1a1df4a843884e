"""What the verbs share: the run flags of ``train`` / ``align-train``, config resolution, launch.

The flags of a training verb map to config keys (``--batch-size`` -> ``data.batch_size``)
and every config key can be set with ``--set KEY=VALUE``; :func:`config_keys` reads the
keys from the config dataclasses, so the command line never lists them by hand.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path


def add_run_flags(p, *, default_config: str) -> None:
    """The flags every training verb has: databases, run folder, config, budget, device."""
    from scarce.config import AMP_MODES  # light: no torch

    p.add_argument("--train-db", required=True)
    p.add_argument("--test-db", help="test database (default: beside --train-db if present)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", default=default_config, help="preset name or YAML file")
    p.add_argument("--learning-rate", type=float, dest="optim.learning_rate")
    p.add_argument("--test-every-n-steps", type=int, dest="test_every_n_steps")
    p.add_argument(
        "--early-stopping",
        type=int,
        dest="early_stopping",
        help="stop after N evaluations without a better test loss (0 = off)",
    )
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--max-minutes", type=float, dest="max_minutes")
    p.add_argument("--reader-count", type=int, dest="data.reader_count")
    p.add_argument("--seed", type=int, dest="seed")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        dest="amp",
        help="mixed precision; auto (default): bf16 where the CPU/GPU has it, fp16 on older GPUs",
    )
    p.add_argument("--device", dest="device", help="auto | cpu | cuda")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config value, e.g. --set model.width=16 --set augment.elastic=true",
    )
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from last.pt")
    p.add_argument("--init-from", help="checkpoint or run folder to fine-tune from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (runs torchrun for you)",
    )


def db_paths(args) -> tuple[Path, Path | None]:
    """``--train-db`` and ``--test-db`` (default: ``test.lmdb`` beside the training one)."""
    train_db = Path(args.train_db)
    if args.test_db:
        return train_db, Path(args.test_db)
    guess = train_db.parent / "test.lmdb"
    return train_db, (guess if guess.is_dir() and guess != train_db else None)


def config_keys(cls: type) -> dict[str, object]:
    """Every dotted key of a config class and its type hint, e.g. ``"data.batch_size": int``.

    The command line builds its flags' destinations and ``--set`` from these.
    """
    out: dict[str, object] = {}

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in fields(c):
            if is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = hints[f.name]

    walk(cls, "")
    return out


def run_config(args, cls: type, base=None):
    """The config of a training verb: ``--config`` (or ``base``), then its flags, then ``--set``.

    Raises
    ------
    scarce.errors.ConfigError
        For an unknown key or a bad value.
    """
    from scarce.config import ConfigError, load_config, override

    cfg = base if base is not None else load_config(args.config, cls)
    keys = config_keys(cls)
    values = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key] = value
    return override(cfg, values)


def relaunch_under_torchrun(args) -> int | None:
    """With ``--nproc K > 1`` outside torchrun, run this command again under torchrun.

    Returns torchrun's exit code (:data:`scarce.lifecycle.EXIT_STOPPED` when a forwarded
    signal stopped the ranks, who then saved ``last.pt``), or ``None`` when this process
    should train itself.
    """
    if args.nproc <= 1 or "WORLD_SIZE" in os.environ:
        return None
    import time

    from scarce.engine.distributed import launch_torchrun
    from scarce.lifecycle import EXIT_STOPPED

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if not a.startswith("--nproc="):
            argv.append(a)
    started = time.time()
    code, forwarded = launch_torchrun(args.nproc, argv)
    summary = Path(args.out) / "summary.json"
    if forwarded and summary.is_file() and summary.stat().st_mtime >= started:
        if json.loads(summary.read_text()).get("stop_reason") == "signal":
            return EXIT_STOPPED
    return code


def finish_run(args, summary: dict) -> int:
    """Print one line about the run (rank 0 only); return the exit code of the verb.

    Returns
    -------
    int
        0, or :data:`scarce.lifecycle.EXIT_STOPPED` when a signal stopped the run.
    """
    from scarce.lifecycle import EXIT_STOPPED

    stopped = summary["stop_reason"] == "signal"
    if int(os.environ.get("RANK", "0")) == 0:
        best = f"best test loss {summary['best_test_loss']:.4f} at step {summary['best_step']}"
        print(
            f"run folder: {args.out} ({summary['stop_reason']} at step {summary['steps']}, "
            + (
                f"{summary['signal']}: last.pt saved, continue with --resume)"
                if stopped
                else f"{best})"
            )
        )
    return EXIT_STOPPED if stopped else 0
