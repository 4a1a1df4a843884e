"""``scarce history``: compare training runs without opening TensorBoard.

One row per run folder (a folder with ``config.yaml``): model, patch and batch size, steps,
wall time, best test loss and mean Dice with the step they were reached, and why the run ended.
``--diff`` lists the config values that differ between the runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from scarce.runlog import read_metrics


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or a folder of run folders.

    Raises
    ------
    FileNotFoundError
        If a path does not exist or holds no run folder.
    """
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder")
        if (p / "config.yaml").is_file():
            runs.append(p)
            continue
        found = sorted(c for c in p.iterdir() if (c / "config.yaml").is_file())
        if not found:
            raise FileNotFoundError(f"{p}: not a run folder (no config.yaml) and holds none")
        runs.extend(found)
    return runs


def run_row(run: Path) -> dict:
    """Facts of one run folder, from ``config.yaml``, ``metrics.csv`` and ``summary.json``."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = read_metrics(run / "metrics.csv")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    tested = [r for r in rows if r.get("test_loss") is not None]
    best_loss = min(tested, key=lambda r: r["test_loss"]) if tested else None
    dice_rows = [r for r in rows if r.get("mean_dice") is not None]
    best_dice = max(dice_rows, key=lambda r: r["mean_dice"]) if dice_rows else None
    steps = summary.get("steps", int(rows[-1]["step"]) if rows else 0)
    return {
        "run": str(run),
        "model": cfg["model"]["name"],
        "width": cfg["model"]["width"],
        "patch": cfg["data"]["patch_size"],
        "batch": cfg["data"]["batch_size"],
        "steps": steps,
        "wall_time_s": summary.get("wall_time_s"),
        "best_test_loss": best_loss["test_loss"] if best_loss else None,
        "best_loss_step": int(best_loss["step"]) if best_loss else None,
        "best_mean_dice": best_dice["mean_dice"] if best_dice else None,
        "best_dice_step": int(best_dice["step"]) if best_dice else None,
        "stop_reason": summary.get("stop_reason", "running or killed"),
        "config": cfg,
    }


def collect_runs(paths: list[str | Path]) -> list[dict]:
    """:func:`run_row` for every run found by :func:`find_runs`."""
    return [run_row(r) for r in find_runs(paths)]


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_history(runs: list[dict]) -> str:
    """A fixed-width table, one row per run."""
    head = [
        "run",
        "model",
        "width",
        "patch",
        "batch",
        "steps",
        "wall s",
        "best test loss",
        "@step",
        "best Dice",
        "@step",
        "ended by",
    ]
    keys = [
        "run",
        "model",
        "width",
        "patch",
        "batch",
        "steps",
        "wall_time_s",
        "best_test_loss",
        "best_loss_step",
        "best_mean_dice",
        "best_dice_step",
        "stop_reason",
    ]
    table = [head] + [[_cell(r[k]) for k in keys] for r in runs]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(runs: list[dict]) -> dict[str, list]:
    """Config keys (dotted) whose values differ between runs -> the value of each run."""
    flat = [_flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat))
    return {
        k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1
    }


def format_diff(runs: list[dict]) -> str:
    """The config differences as ``key: value_run1 | value_run2 | ...`` lines."""
    diff = config_diff(runs)
    if len(runs) < 2:
        return "(--diff needs at least two runs)"
    if not diff:
        return "configs are identical"
    names = " | ".join(Path(r["run"]).name for r in runs)
    return "\n".join(
        [f"config differences ({names}):"]
        + [f"  {k}: " + " | ".join(_cell(v) for v in vals) for k, vals in diff.items()]
    )
