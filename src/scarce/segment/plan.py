"""``scarce plan``: a segmentation run that fits the machine and the time budget, predicted
before the first step.

:func:`plan_run` surveys the data (:mod:`scarce.segment.survey`), measures the machine
(:mod:`scarce.segment.machine`) and sizes the run by the rules of :mod:`scarce.segment.planner`;
the :class:`Plan` holds the config ``scarce train --config plan.yaml`` runs as it is, every
choice with its reason, the predicted times and memory, and the scale table.
:func:`predict_config` predicts an explicit config's wall time the same way, so ``scarce
train`` can warn when it cannot end inside ``--max-minutes``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scarce.atomic import write_text
from scarce.config import TrainConfig, config_to_dict, load_config, override
from scarce.data.store import read_metadata
from scarce.data.workers import resolve_reader_count
from scarce.engine.distributed import resolve_amp, resolve_device
from scarce.errors import ConfigError
from scarce.segment.machine import Candidate, LocalMachine, Machine
from scarce.segment.planner import SAFETY, TARGET_STEPS, Planner
from scarce.segment.scale import format_scale_table
from scarce.segment.survey import survey_database
from scarce.segment.targets import resolve_target

logger = logging.getLogger("scarce")

STOP_S = 5.0  # after the hard stop: final checkpoint, summary, process exit (seconds)
FAR = 1.5  # scarce train warns when an explicit config is predicted to take this x the budget


@dataclass
class Plan:
    """A planned run: its config, the choices with reasons, and the predicted costs.

    Attributes
    ----------
    config : TrainConfig
        What ``scarce train --config plan.yaml`` runs.
    minutes : float
        The budget the schedule fills, minutes (the asked budget less the planning's own time
        when that counts).
    budget_minutes : float
        The budget asked for, minutes.
    choices : list of dict
        ``setting``, ``value``, ``reason`` per choice.
    predicted : dict
        ``seconds_per_step``, ``seconds_per_evaluation``, ``evaluations``,
        ``seconds_to_first_evaluation``, ``setup_seconds``, ``total_seconds``,
        ``peak_memory_bytes``, ``memory_limit_bytes``, ``readers_keep_up``,
        ``reader_batches_per_second`` (all workers), ``needed_batches_per_second``, ``steps``.
    data, machine : dict
        The survey (without per-sample shapes) and :func:`scarce.engine.probe.machine_facts`.
    scale_table : list of dict
        Best foreground Dice (and object F1) at each downscale factor.
    measured : list of dict
        Every candidate measured: its sizes, seconds per step, peak memory.
    notes : list of str
        Warnings and remarks (budget too small, padding of small images, ...).
    seconds : float
        Time the planning took.
    """

    config: TrainConfig
    minutes: float
    choices: list[dict]
    predicted: dict
    data: dict
    machine: dict
    scale_table: list[dict]
    measured: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    budget_minutes: float = 0.0

    def to_dict(self) -> dict:
        """Plain values for ``plan.json`` (the config as nested dicts)."""
        out = {k: getattr(self, k) for k in ("minutes", "choices", "predicted", "data")}
        out.update(machine=self.machine, scale_table=self.scale_table, measured=self.measured)
        out.update(notes=self.notes, seconds=round(self.seconds, 1))
        out["budget_minutes"] = self.budget_minutes
        out["config"] = config_to_dict(self.config)
        return out


def recipe_for(train_db) -> TrainConfig:
    """The preset a plan starts from: ``nuclei-instances`` for instance masks, else ``default``."""
    kind = read_metadata(train_db)["mask_kind"]
    return load_config("nuclei-instances" if kind == "instance" else "default")


def plan_run(
    train_db,
    test_db=None,
    *,
    minutes: float,
    cfg: TrainConfig | None = None,
    device: str | None = None,
    amp: str | None = None,
    seed: int | None = None,
    machine: Machine | None = None,
    data: dict | None = None,
    count_planning: bool = False,
    spent_seconds: float = 0.0,
) -> Plan:
    """Plan a training run of ``minutes`` on this machine (``scarce plan``).

    Parameters
    ----------
    train_db, test_db : path-like
        Databases written by ``scarce ingest`` (``test_db`` may be None: no evaluations).
    minutes : float
        The budget for the whole run (set-up, steps, evaluations), minutes (> 0).
    cfg : TrainConfig, optional
        The recipe to size; default :func:`recipe_for` the database.
    device, amp, seed : optional
        Override the recipe's ``device``, ``amp`` (``off`` measures and plans float32) and
        ``seed``.
    machine : Machine, optional
        Default :class:`~scarce.segment.machine.LocalMachine` (measures this machine).
    data : dict, optional
        Default :func:`~scarce.segment.survey.survey_database` of the databases.
    count_planning : bool
        Take the planning's own time out of the budget (``scarce train --max-minutes``
        plans first in the same budget).
    spent_seconds : float
        Time already spent before planning (e.g. the process's start-up), also taken out of
        the budget when ``count_planning``.

    Returns
    -------
    Plan

    Raises
    ------
    scarce.errors.ConfigError
        For ``minutes <= 0`` or a bad override.
    scarce.errors.StoreError
        If a database is missing.
    """
    start, budget = time.perf_counter(), minutes
    if not minutes or minutes <= 0:
        raise ConfigError(f"the budget must be > 0 minutes, got {minutes}")
    cfg = cfg if cfg is not None else recipe_for(train_db)
    given = {"device": device, "amp": amp, "seed": seed}
    cfg = override(cfg, {k: v for k, v in given.items() if v is not None})
    data = data if data is not None else survey_database(train_db, test_db)
    machine = machine or LocalMachine(train_db, cfg, cfg.device)
    planner = Planner(cfg, data, machine, minutes)
    meta, dcfg = read_metadata(train_db), cfg.data
    target = resolve_target(meta, dcfg.target, boundary_width=dcfg.boundary_width)
    planner.num_classes = target.num_classes
    best = planner.search()
    if count_planning:  # the same schedule in what is left of the budget
        spent = (time.perf_counter() - start + spent_seconds) / 60.0
        minutes = max(0.1 * budget, minutes - spent)
        planner.budget = 60.0 * minutes
        best = planner.schedule(best["candidate"], exact=True)
    config = _config(cfg, best, planner, minutes)
    predicted = {
        k: v for k, v in best.items() if k not in ("candidate", "fits_memory", "estimated")
    }
    kept = {k: v for k, v in data.items() if k not in ("shapes", "test_shapes", "scale_table")}
    return Plan(
        config=config,
        minutes=minutes,
        choices=_choices(config, best, planner),
        predicted=predicted,
        data=kept,
        machine=dict(machine.facts),
        scale_table=data["scale_table"],
        measured=[
            {**vars(c), "seconds_per_step": t.seconds, "peak_bytes": t.peak_bytes}
            for c, t in planner.steps.items()
        ],
        notes=planner.notes,
        seconds=time.perf_counter() - start,
        budget_minutes=budget,
    )


def _config(cfg: TrainConfig, best: dict, planner: Planner, minutes: float) -> TrainConfig:
    """The recipe with the planned sizes."""
    c, steps = best["candidate"], max(1, best["steps"])
    return override(
        cfg,
        {
            "data.patch_size": c.patch,
            "data.batch_size": c.batch,
            "data.downscale": c.downscale,
            "data.reader_count": best["readers"],
            "data.test_tile_size": planner.test_tile(c),
            "model.width": c.width,
            "model.depth": c.depth,
            "model.widths": None,
            "amp": c.amp,
            "max_steps": steps,
            "test_every_n_steps": max(1, best["test_every_n_steps"]),
            # the hard stop leaves room for the final evaluation, checkpoint and summary
            "max_minutes": round(
                max(0.5 * minutes, minutes - (best["seconds_per_evaluation"] + STOP_S) / 60), 2
            ),
            "optim.warmup_steps": min(cfg.optim.warmup_steps, max(1, steps // 10)),
        },
    )


def _model_facts(cfg: TrainConfig, channels: int, classes: int) -> str:
    from scarce.models import build_model

    m = cfg.model
    net = build_model(m.name, channels, classes, depth=m.depth, width=m.width, norm=m.norm)
    params = sum(p.numel() for p in net.parameters())
    return f"{params / 1e6:.1f} M parameters, receptive field {net.receptive_field} px"


def _choices(cfg: TrainConfig, best: dict, planner: Planner) -> list[dict]:
    """One row per choice: setting, value and why."""
    c, d, r = best["candidate"], planner.data, planner.reasons
    first = planner.tried[0] if planner.tried else best
    if c.downscale == 1:
        why_scale = f"native resolution: {first['steps']} steps fit (a run needs {TARGET_STEPS})"
    else:
        row = next(x for x in d["scale_table"] if x["factor"] == c.downscale)
        kept = f"fg Dice {row['dice']:.4f}" + (
            f", object F1 {row['object_f1']:.4f}" if "object_f1" in row else ""
        )
        why_scale = (
            f"at full resolution only {first['steps']} of the {TARGET_STEPS} steps fit; "
            f"downscaled by {c.downscale:g} the masks keep {kept} (scale table)"
        )
    classes = planner.num_classes
    tile = cfg.data.test_tile_size
    rows = [
        ("data.downscale", f"{c.downscale:g}", why_scale),
        (
            "data.patch_size",
            f"{c.patch}",
            f"{c.patch * c.downscale:g} source px; {r['fov']}; smallest training image "
            f"{d['min_side']} px",
        ),
        (
            "model",
            f"{cfg.model.name} width {c.width} depth {c.depth}",
            "; ".join(x for x in (_model_facts(cfg, d["channels"], classes), r.get("width")) if x),
        ),
        ("data.batch_size", f"{c.batch}", r.get("batch", "")),
        ("amp", c.amp, r.get("amp", "")),
        (
            "data.reader_count",
            f"{best['readers']}",
            f"{best['reader_batches_per_second']:.1f} batches/s from the readers for "
            f"{best['needed_batches_per_second']:.1f} needed"
            + ("" if best["readers_keep_up"] else ": they set the pace"),
        ),
        (
            "test_every_n_steps",
            f"{cfg.test_every_n_steps}",
            f"{best['evaluations']} evaluation(s) of {best['seconds_per_evaluation']:.1f} s, "
            f"the last at max_steps",
        ),
        ("data.test_tile_size", f"{tile}", "test images evaluated in tiles of this side"),
        (
            "max_steps",
            f"{cfg.max_steps}",
            f"steps of {best['seconds_per_step']:.2f} s end at "
            f"{best['total_seconds'] / 60:.1f} min ({SAFETY:.0%} of the budget)",
        ),
        (
            "max_minutes",
            f"{cfg.max_minutes:g}",
            "the budget less the final evaluation: the run stops there in any case",
        ),
    ]
    return [{"setting": s, "value": v, "reason": w} for s, v, w in rows]


def format_plan(plan: Plan) -> str:
    """The plan as text: data and machine, the choices and why, the scale table, predictions."""
    d, m, p = plan.data, plan.machine, plan.predicted
    diam = d["diameters"]
    objects = (
        f"objects: median {diam['median']:.0f} px, 95th percentile {diam['p95']:.0f} px"
        if diam["median"] is not None
        else "no objects in the masks read"
    )
    left = (
        f" ({plan.minutes:.1f} left after planning)" if plan.minutes < plan.budget_minutes else ""
    )
    lines = [
        f"Plan for {plan.budget_minutes:g} min{left} on {m['device']} ({m['name']}, "
        f"{m['cores']} cores, load {m.get('load_1min')}), measured in {plan.seconds:.0f} s",
        f"data: {d['num_samples']} training samples, sides {d['min_side']}-{d['max_side']} px, "
        f"{d['channels']} channel(s), {d['mask_kind']} masks, pixel size "
        f"{d['pixel_size_um'] or 'unknown'} um; {objects}",
        "",
    ]
    width = max(len(c["setting"]) for c in plan.choices)
    vwidth = max(len(c["value"]) for c in plan.choices)
    for c in plan.choices:
        lines.append(f"{c['setting']:<{width}}  {c['value']:<{vwidth}}  {c['reason']}")
    lines += ["", "scale table (from the training masks alone):"]
    lines += [
        f"  {line}" for line in format_scale_table(plan.scale_table, diam["median"]).split("\n")
    ]
    gb = 1 << 30
    lines += [
        "",
        f"predicted: {p['seconds_per_step']:.2f} s per step, {p['seconds_per_evaluation']:.1f} s "
        f"per evaluation ({p['evaluations']}), first evaluation after "
        f"{p['seconds_to_first_evaluation'] / 60:.1f} min, total {p['total_seconds'] / 60:.1f} "
        f"of {plan.minutes:.1f} min",
        f"peak memory {p['peak_memory_bytes'] / gb:.2f} GiB (plan limit "
        f"{p['memory_limit_bytes'] / gb:.1f} GiB); readers keep up: "
        f"{'yes' if p['readers_keep_up'] else 'no'}",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def write_plan(plan: Plan, out) -> tuple[Path, Path]:
    """Write ``out`` (the config, for ``scarce train --config``) and ``out`` as ``.json``.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        The YAML config and the JSON plan (choices, predictions, measurements).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    p = plan.predicted
    head = (
        f"# scarce plan: {plan.minutes:.1f} min on {plan.machine['device']}; predicted "
        f"{p['total_seconds'] / 60:.1f} min, {p['steps']} steps of {p['seconds_per_step']:.2f} s; "
        f"reasons in {out.with_suffix('.json').name}\n"
    )
    write_text(out, head + yaml.safe_dump(config_to_dict(plan.config), sort_keys=False))
    report = out.with_suffix(".json")
    write_text(report, json.dumps(plan.to_dict(), indent=1, default=str) + "\n")
    return out, report


def predict_config(cfg: TrainConfig, train_db, test_db=None, *, machine=None) -> dict:
    """Predicted wall time of an explicit config (its ``max_steps``), measured as a plan is.

    Returns
    -------
    dict
        :meth:`Planner.schedule`'s keys for the config's sizes, with ``total_seconds`` for
        its own ``max_steps`` and ``test_every_n_steps``.
    """
    data = survey_database(train_db, test_db, max_masks=0)
    machine = machine or LocalMachine(train_db, cfg, cfg.device)
    planner = Planner(cfg, data, machine, cfg.max_minutes or 60.0)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    c = Candidate.of(cfg, amp)
    s = planner.schedule(c, readers=resolve_reader_count(cfg.data.reader_count))
    evals = math.ceil(cfg.max_steps / cfg.test_every_n_steps)
    s["total_seconds"] = (
        s["setup_seconds"]
        + cfg.max_steps * s["seconds_per_step"]
        + evals * s["seconds_per_evaluation"]
    )
    s["steps"] = cfg.max_steps
    return s


def budget_warning(cfg: TrainConfig, train_db, test_db=None, *, machine=None) -> str | None:
    """A warning when ``cfg`` is predicted to run far over ``cfg.max_minutes``, with advice.

    Returns
    -------
    str or None
        None when the config ends within ``FAR`` x its budget (or has none); else the
        prediction, where the run will stop, and the sizes :func:`plan_run` chooses instead.
    """
    if not cfg.max_minutes:
        return None
    pred = predict_config(cfg, train_db, test_db, machine=machine)
    if pred["total_seconds"] <= FAR * 60 * cfg.max_minutes:
        return None
    stop = int((60 * cfg.max_minutes - pred["setup_seconds"]) / pred["seconds_per_step"])
    advice = plan_run(train_db, test_db, minutes=cfg.max_minutes, cfg=cfg, machine=machine)
    a = advice.config
    return (
        f"the config is predicted to take {pred['total_seconds'] / 60:.1f} min for max_steps = "
        f"{cfg.max_steps} ({pred['seconds_per_step']:.2f} s per step here), far over "
        f"--max-minutes {cfg.max_minutes:g}: it will stop near step {max(stop, 0)} with its "
        f"learning-rate schedule unfinished. `scarce plan` advises for {cfg.max_minutes:g} min: "
        f"downscale {a.data.downscale:g}, patch {a.data.patch_size}, batch {a.data.batch_size}, "
        f"width {a.model.width}, depth {a.model.depth}, amp {a.amp}, max_steps {a.max_steps}, "
        f"test every {a.test_every_n_steps} steps (scarce plan --minutes {cfg.max_minutes:g} "
        "--out plan.yaml, then scarce train --config plan.yaml)"
    )
