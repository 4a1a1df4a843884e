"""``scarce history``: compare training runs without opening TensorBoard.

One row per run folder (a folder with ``config.yaml``) of any task: task, model, patch and batch
size, steps, wall time, best test loss and the task's headline metric (segmentation: mean
foreground Dice; the best value and its step), and why the run ended. ``--diff`` lists the
config values that differ between the runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from scarce.engine.runlog import read_metrics
from scarce.errors import MissingInputError


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or a folder of run folders.

    Raises
    ------
    MissingInputError
        If a path does not exist or holds no run folder.
    """
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise MissingInputError(f"{p}: no such folder")
        if (p / "config.yaml").is_file():
            runs.append(p)
            continue
        found = sorted(c for c in p.iterdir() if (c / "config.yaml").is_file())
        if not found:
            raise MissingInputError(f"{p}: not a run folder (no config.yaml) and holds none")
        runs.extend(found)
    return runs


def run_row(run: Path) -> dict:
    """Facts of one run folder, from ``config.yaml``, ``metrics.csv`` and ``summary.json``.

    The headline metric is the one ``summary.json`` names (``headline``); runs without it
    (still running, killed, or written before tasks named it) use ``mean_dice``. Its best
    value is the largest for ``mean_dice`` and the smallest for error metrics (names ending
    in ``_px`` or ``error``).
    """
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = read_metrics(run / "metrics.csv")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    headline = summary.get("headline", "mean_dice")
    lower_is_better = headline.endswith(("_px", "error"))
    tested = [r for r in rows if r.get("test_loss") is not None]
    best_loss = min(tested, key=lambda r: r["test_loss"]) if tested else None
    scored = [r for r in rows if r.get(headline) is not None]
    pick = min if lower_is_better else max
    best_metric = pick(scored, key=lambda r: r[headline]) if scored else None
    steps = summary.get("steps", int(rows[-1]["step"]) if rows else 0)
    model, data = cfg.get("model", {}), cfg.get("data", {})
    return {
        "run": str(run),
        "task": summary.get("task", "segment"),
        "model": model.get("name"),
        "width": model.get("width"),
        "patch": data.get("patch_size"),
        "batch": data.get("batch_size"),
        "steps": steps,
        "wall_time_s": summary.get("wall_time_s"),
        "best_test_loss": best_loss["test_loss"] if best_loss else None,
        "best_loss_step": int(best_loss["step"]) if best_loss else None,
        "headline": headline,
        "best_headline": best_metric[headline] if best_metric else None,
        "best_headline_step": int(best_metric["step"]) if best_metric else None,
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
        "task",
        "model",
        "width",
        "patch",
        "batch",
        "steps",
        "wall s",
        "best test loss",
        "@step",
        "best headline metric",
        "@step",
        "ended by",
    ]
    keys = [
        "run",
        "task",
        "model",
        "width",
        "patch",
        "batch",
        "steps",
        "wall_time_s",
        "best_test_loss",
        "best_loss_step",
        "best_headline",
        "best_headline_step",
        "stop_reason",
    ]

    def cell(r: dict, k: str) -> str:
        if k == "best_headline" and r[k] is not None:
            return f"{r['headline']} {_cell(r[k])}"
        return _cell(r[k])

    table = [head] + [[cell(r, k) for k in keys] for r in runs]
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


def lineage(run: str | Path) -> list[dict]:
    """A run and its ancestors through ``--init-from``, newest first (SEAMLeSS's ``net_hist``).

    Each run's ``summary.json`` names the checkpoint or run it was fine-tuned from
    (``init_from``); the chain ends at a run trained from scratch, or at an ancestor whose
    folder is gone (its row then says so).

    Returns
    -------
    list of dict
        Per run: ``run``, ``task``, ``steps``, ``best_test_loss``, ``headline`` and its best
        value, ``learning_rate``, ``loss`` (the loss section of its config), ``init_from``.

    Raises
    ------
    scarce.errors.MissingInputError
        If ``run`` is not a run folder.
    """
    chain, seen = [], set()
    current: Path | None = Path(run)
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        if current.is_file():  # a checkpoint: its run folder is two levels up
            current = current.parent.parent
        if not (current / "config.yaml").is_file():
            if not chain:
                raise MissingInputError(f"{current}: not a run folder (no config.yaml)")
            chain.append({"run": str(current), "missing": True})
            break
        row = run_row(current)
        summary_path = current / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        parent = summary.get("init_from")
        chain.append(
            {
                "run": str(current),
                "task": row["task"],
                "steps": row["steps"],
                "best_test_loss": row["best_test_loss"],
                "headline": row["headline"],
                "best_headline": row["best_headline"],
                "learning_rate": row["config"].get("optim", {}).get("learning_rate"),
                "loss": row["config"].get("loss", {}),
                "init_from": parent,
            }
        )
        current = Path(parent) if parent else None
    return chain


def format_lineage(chain: list[dict]) -> str:
    """The lineage as indented lines, newest first."""
    lines = []
    for depth, r in enumerate(chain):
        pad = "  " * depth + ("<- " if depth else "")
        if r.get("missing"):
            lines.append(f"{pad}{r['run']} (folder not found)")
            continue
        weights = ", ".join(f"{k}={v}" for k, v in r["loss"].items() if not isinstance(v, dict))
        lines.append(
            f"{pad}{r['run']}: {r['task']}, {r['steps']} steps, lr {r['learning_rate']}, "
            f"best test loss {_cell(r['best_test_loss'])}, {r['headline']} "
            f"{_cell(r['best_headline'])}; loss: {weights}"
            + ("" if r["init_from"] else " (trained from scratch)")
        )
    return "\n".join(lines)
