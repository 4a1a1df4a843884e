"""The search behind ``scarce plan``: rules that size a run to the machine and the budget.

The plan starts from a recipe (a preset: ``nuclei-instances`` for instance masks, else
``default``; or the user's config) and chooses only how big the run is: downscale factor,
patch, batch, model width and depth, mixed precision, reader count, the evaluation interval
and ``max_steps``. It reads the data (:func:`scarce.segment.survey.survey_database`: image
sizes, object sizes, the scale table), **measures** the machine on candidate sizes
(:class:`scarce.segment.machine.LocalMachine`: timed training steps, a forward pass over test
tiles, one reader worker, peak memory) and predicts the run's wall time from those
measurements:

``total = setup + max_steps * step + evaluations * evaluation``

where ``step`` adds the readers' CPU time shared over the cores (CPU) or is the readers'
pace when they cannot keep up. The rules, in order:

1. Field of view: the patch covers ``clip(2 x the 95th-percentile object diameter, 256, 512)``
   source pixels, never more than the smallest training image.
2. The schedule should reach ``TARGET_STEPS`` optimiser steps inside ``SAFETY`` x the budget
   (600: where the default recipe converged on nist_rpe, isbi2012 and bbbc039,
   benchmarks/results/accuracy.md). Native resolution first; if it cannot, the images are
   downscaled (2, 3, 4) while the scale table keeps foreground Dice and object F1 >= ``CEILING``
   (the same field of view in fewer pixels, about f**2 times cheaper); then the patch shrinks
   (down to 64 px), then the batch; failing all, the cheapest candidate and a warning.
3. Spare time buys steps (up to ``MAX_STEPS``) and a wider model when it still gets twice
   the target steps; on a GPU the batch is the smallest within 10 % of the best samples/s.
4. Evaluations take at most ``EVAL_SHARE`` of the budget (1 to 10 of them; the last one at
   ``max_steps``); the batch keeps the predicted peak memory under ``MEMORY_SHARE`` of what is
   free; readers: enough workers for 1.25 x the step rate, at most half the cores on a CPU.

References
----------
Isensee F. et al. "nnU-Net." Nature Methods 18:203-211 (2021). doi:10.1038/s41592-020-01008-z
(rule-based configuration from the data and the GPU memory; here also from time and CPUs).
"""

from __future__ import annotations

import math
from dataclasses import replace

from scarce.config import TrainConfig
from scarce.engine.distributed import resolve_amp, resolve_device
from scarce.engine.tiling import tile_starts
from scarce.errors import DeviceError
from scarce.segment.machine import Candidate, Machine, ReaderRate, Timing
from scarce.segment.survey import scaled_sides

TARGET_STEPS = 600  # optimiser steps a short run needs (see the module docstring)
MIN_STEPS = 300  # below this the plan warns that the run cannot converge in the budget
MAX_STEPS = 20000  # spare time beyond this is left unused
SAFETY = 0.9  # the schedule ends at this share of the budget
CEILING = 0.99  # downscale only while the masks keep this foreground Dice and object F1
FOV = (256, 512)  # field of view of a patch in source pixels: at least, at most
PATCHES = (32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024)
PATCH_FLOOR = 64  # the patch shrinks no further than this (smaller images: their size)
EVAL_SHARE = 0.1  # evaluations take at most this share of the budget
MAX_EVALS = 10
MEMORY_SHARE = {"cpu": 0.6, "cuda": 0.85}  # of the free memory a run may plan to use
SETUP_S = 4.0  # task set-up, first plot, final checkpoint and summary (measured, nist_rpe)
EVAL_OVERHEAD_S = 1.0  # checkpoint, plot and metrics row per evaluation (measured)
EVAL_PIXEL_S = 5e-8  # normalisation, loss and confusion matrix per test pixel, seconds
WIDER_COST = 3.0  # a doubled width costs at least this per step (3.5x measured on a CPU)
RUN_BYTES = 256 << 20  # CPU: what a run holds beyond the probes (readers' queues, TensorBoard,
# plots, test images; measured 200-260 MB on nist_rpe)


class Planner:
    """The search of the module docstring over one machine, with memoised measurements."""

    def __init__(self, cfg: TrainConfig, data: dict, machine: Machine, minutes: float):
        self.cfg, self.data, self.machine = cfg, data, machine
        self.budget = 60.0 * minutes
        self.gpu = str(machine.facts["device"]).startswith("cuda")
        self.kind = "cuda" if self.gpu else "cpu"
        self.cores = int(machine.facts["cores"])
        self.memory_limit = MEMORY_SHARE[self.kind] * machine.facts["memory_bytes"]
        self.steps, self.forwards, self.rates = {}, {}, {}
        self.notes: list[str] = []
        self.reasons: dict[str, str] = {}
        self.tried: list[dict] = []
        self.base_batch = 4
        self.num_classes = 2  # for the report; set by the caller

    # ------------------------------------------------------------------ measurements
    def step(self, c: Candidate):
        if c not in self.steps:
            self.steps[c] = self.machine.step(c)
        return self.steps[c]

    def rate(self, c: Candidate):
        key = (c.downscale, c.patch, c.batch)
        if key not in self.rates:
            self.rates[key] = self.machine.readers(c)
        return self.rates[key]

    def forward(self, c: Candidate, tile: int, batch: int):
        key = (c.width, c.depth, c.amp, tile, batch)
        if key not in self.forwards:
            self.forwards[key] = self.machine.forward(replace(c, batch=batch), tile)
        return self.forwards[key]

    # -------------------------------------------------------------------- predictions
    def test_shapes(self, c: Candidate) -> list[tuple[int, int]]:
        """Test images (or none) at the working scale, pixels."""
        train_px, test_px = self.data["pixel_size_um"], self.data["test_pixel_size_um"]
        f = c.downscale * (train_px / test_px if train_px and test_px else 1.0)
        return [(max(1, round(h / f)), max(1, round(w / f))) for h, w in self.data["test_shapes"]]

    def test_tile(self, c: Candidate) -> int:
        """One tile per test image up to 1024 px, else the recipe's test tile."""
        m = 2**c.depth
        side = max([max(s) for s in self.test_shapes(c)] or [c.patch])
        side = -(-side // m) * m
        return side if side <= 1024 else self.cfg.data.test_tile_size

    def evaluation(self, c: Candidate, step=None) -> tuple[float, int]:
        """Predicted seconds per evaluation and the forward pass's peak memory (bytes).

        With ``step`` (a :class:`Timing` of ``c``) the forward pass is estimated as a third of
        the step's time per pixel instead of measured.
        """
        shapes = self.test_shapes(c)
        if not shapes:
            return EVAL_OVERHEAD_S, 0
        tile, m = self.test_tile(c), 2**c.depth
        tiles = []
        for h, w in shapes:
            sizes = [max(tile, -(-n // m) * m) for n in (h, w)]
            tiles.append(
                math.prod(len(tile_starts(n, tile, self.cfg.predict.overlap, m)) for n in sizes)
            )
        batch = min(c.batch, max(tiles))
        if step is None:
            fwd = self.forward(c, tile, batch)
        else:
            fwd = Timing(step.seconds * batch * tile * tile / c.pixels / 3, step.peak_bytes)
        passes = sum(math.ceil(t / batch) for t in tiles)
        full = sum(h * w for h, w in self.data["test_shapes"])
        return EVAL_OVERHEAD_S + passes * fwd.seconds + EVAL_PIXEL_S * full, fwd.peak_bytes

    def schedule(self, c: Candidate, readers: int | None = None, exact: bool = False) -> dict:
        """Readers, evaluations, steps and the predicted times and memory of candidate ``c``.

        ``readers`` fixes the worker count (default: enough for 1.25 x the step rate). Unless
        ``exact``, a candidate whose training step alone cannot reach 80 % of
        ``TARGET_STEPS`` is not measured further: its readers are taken as free and its
        evaluation is estimated from the step (a forward pass is about a third of a step).
        """
        timing = self.step(c)
        hopeless = (SAFETY * self.budget - SETUP_S) / timing.seconds < 0.8 * TARGET_STEPS
        estimate = hopeless and not exact and readers is None
        rate = ReaderRate(1e9, 0.0) if estimate else self.rate(c)
        read_s = 1.0 / max(rate.batches_per_second, 1e-9)  # one worker's time per batch
        wall = timing.seconds + (0.0 if self.gpu else read_s / self.cores)
        cap = max(1, self.cores // 2) if not self.gpu else max(1, self.cores - 1)
        readers = readers or min(cap, max(1, math.ceil(1.25 * read_s / wall)))
        keep_up = readers / read_s >= 1.0 / wall
        wall = max(wall, read_s / readers)
        eval_s, eval_peak = self.evaluation(c, timing if estimate else None)
        setup = SETUP_S + rate.startup_seconds
        k = int(min(MAX_EVALS, max(1, EVAL_SHARE * self.budget // eval_s)))
        steps = int(min(MAX_STEPS, max(0.0, (SAFETY * self.budget - setup - k * eval_s) / wall)))
        k = max(1, min(k, steps))
        every = max(1, steps // k)
        steps = every * k if steps >= k else steps
        extra = 0 if self.gpu else RUN_BYTES
        peak = self.machine.base_bytes + extra + max(timing.peak_bytes, eval_peak)
        return {
            "candidate": c,
            "steps": steps,
            "test_every_n_steps": every,
            "evaluations": k,
            "readers": readers,
            "seconds_per_step": wall,
            "seconds_per_evaluation": eval_s,
            "setup_seconds": setup,
            "seconds_to_first_evaluation": setup + every * wall + eval_s,
            "total_seconds": setup + steps * wall + k * eval_s,
            "peak_memory_bytes": int(peak),
            "memory_limit_bytes": int(self.memory_limit),
            "readers_keep_up": bool(keep_up),
            "reader_batches_per_second": readers / read_s,
            "needed_batches_per_second": 1.0 / max(timing.seconds, 1e-9),
            "fits_memory": peak <= self.memory_limit,
            "estimated": estimate,
        }

    # ------------------------------------------------------------------------ choices
    def field_of_view(self) -> int:
        d95 = self.data["diameters"]["p95"] or 0.0
        fov = int(min(FOV[1], max(FOV[0], 2 * d95)))
        self.reasons["fov"] = (
            f"field of view {fov} px = clip(2 x the 95th-percentile object diameter "
            f"{d95:.0f} px, {FOV[0]}, {FOV[1]})"
        )
        return fov

    def scales(self) -> list[float]:
        """Downscale factors whose scale-table ceiling is >= CEILING, ascending."""
        ok = [
            r["factor"]
            for r in self.data["scale_table"]
            if r["factor"] <= 4
            and r["dice"] >= CEILING
            and r.get("object_f1", 1.0) >= CEILING
            and scaled_sides(self.data, r["factor"])[0] >= 32
        ]
        return sorted(set([1.0, *map(float, ok)]))

    def patch_at(self, fov: int, f: float) -> tuple[int, list[int]]:
        """The ladder patch for ``fov`` at factor ``f`` and the smaller ones (ascending) that
        the search may fall back to; never larger than the smallest image."""
        smallest = scaled_sides(self.data, f)[0]
        fits = [p for p in PATCHES if p <= smallest]
        if not fits:  # images smaller than any patch: pad them by reflection
            patch = max(16, -(-smallest // 8) * 8)
            self.notes.append(
                f"training images as small as {smallest} px at downscale {f:g}: patches of "
                f"{patch} px, images padded by reflection (the readers do this)"
            )
            return patch, []
        patch = [p for p in fits if p <= max(fov / f, fits[0])][-1]
        return patch, [p for p in fits if min(PATCH_FLOOR, patch) <= p < patch]

    def candidate(self, f, patch, batch, width, amp) -> Candidate:
        """A candidate whose depth keeps the patch a multiple of 2**depth and >= 4 at the bottom."""
        depth = self.cfg.model.depth
        while depth > 1 and (patch % 2**depth or patch // 2**depth < 4):
            depth -= 1
        return Candidate(float(f), int(patch), int(batch), int(width), depth, amp)

    def choose_amp(self, reference: Candidate) -> str:
        """The config's amp; else bf16 on GPUs, and on CPUs with bf16 unless measured slower."""
        if self.cfg.amp != "auto":
            self.reasons["amp"] = f"{self.cfg.amp}: as the config (or --amp) asks"
            return self.cfg.amp
        if self.gpu:
            amp = resolve_amp("auto", resolve_device(self.machine.facts["device"]))
            self.reasons["amp"] = f"{amp}: this GPU's fastest mixed precision"
            return amp
        if not self.machine.facts["bf16"]:
            self.reasons["amp"] = "off: this CPU has no bf16 instructions (emulated bf16 is slower)"
            return "off"
        off = self.step(replace(reference, amp="off")).seconds
        bf16 = self.step(replace(reference, amp="bf16")).seconds
        amp = "bf16" if bf16 <= 1.05 * off else "off"
        self.reasons["amp"] = f"{amp}: bf16 steps measured {off / bf16:.2f}x as fast as float32"
        return amp

    def batch_for(self, f, patch, width, amp) -> int:
        """CPU: 4 (the measured recipe). GPU: smallest batch within 10 % of the best samples/s."""
        self.base_batch = 4
        if not self.gpu:
            self.reasons["batch"] = "4 per step on a CPU (the recipe measured in accuracy.md)"
            return 4
        rates = {}
        for b in (8, 16, 32, 64, 128):
            s = self.schedule(self.candidate(f, patch, b, width, amp))
            if not s["fits_memory"]:
                break
            rates[b] = b / s["seconds_per_step"]
        if not rates:
            return 8
        best = max(rates.values())
        batch = self.base_batch = min(b for b, r in rates.items() if r >= 0.9 * best)
        self.reasons["batch"] = (
            f"{batch}: {rates[batch]:.0f} samples/s, within 10 % of the best ({best:.0f}/s)"
        )
        return batch

    def fitted(self, c: Candidate) -> dict | None:
        """The schedule of ``c``, its batch halved until it fits in memory (None: never)."""
        while True:
            s = self.schedule(c)
            if s["fits_memory"]:
                return s
            if c.batch <= 1:
                return None
            c = replace(c, batch=c.batch // 2)
            self.reasons["batch"] = f"{c.batch}: the largest that fits in memory"

    def search(self) -> dict:
        """Rules 1-3 of the module docstring; the chosen candidate's schedule."""
        load = self.machine.facts.get("load_1min")
        if not self.gpu and load is not None and load > self.cores:
            self.notes.append(
                f"other jobs keep this CPU busy (1-minute load {load:g} on {self.cores} cores): "
                "the measurements, and this plan, assume they go on; if they stop, the run "
                "ends early, if they grow, at max_minutes with fewer steps"
            )
        fov = self.field_of_view()
        widths = (32, 64) if self.gpu else (16, 32)
        patch, _ = self.patch_at(fov, 1.0)
        amp = self.choose_amp(self.candidate(1.0, patch, 8 if self.gpu else 4, widths[0], "off"))

        def attempt(f: float, patch: int, batch: int) -> bool:
            c = self.candidate(f, patch, batch, widths[0], amp)
            if self.tried:  # skip what the last measurement says cannot reach the target
                last = self.tried[-1]
                guess = last["steps"] * last["candidate"].pixels / c.pixels
                if guess < 0.8 * TARGET_STEPS:
                    return False
            s = self.fitted(c)
            if s is not None:
                self.tried.append(s)
            return s is not None and s["steps"] >= TARGET_STEPS

        for f in self.scales():
            patch, smaller = self.patch_at(fov, f)
            if attempt(f, patch, self.batch_for(f, patch, widths[0], amp)):
                break
        else:  # at the largest factor: smaller patches, then half the batch
            batch = self.tried[-1]["candidate"].batch if self.tried else 4
            _ = any(attempt(f, p, batch) for p in reversed(smaller)) or attempt(
                f, (smaller or [patch])[0], max(1, batch // 2)
            )
        return self._finish(widths)

    def _finish(self, widths) -> dict:
        if not self.tried:
            raise DeviceError(
                f"no run fits in the memory of {self.machine.facts['device']} "
                f"({self.machine.facts['memory_bytes'] / 2**30:.1f} GiB free), not even one "
                "sample per step; free memory or use a smaller model (--set model.width=8)"
            )
        ok = [s for s in self.tried if s["steps"] >= TARGET_STEPS]
        best = ok[0] if ok else max(self.tried, key=lambda s: s["steps"])
        best = self.schedule(best["candidate"], exact=True)
        if best["candidate"].batch < self.base_batch and "memory" not in self.reasons["batch"]:
            self.reasons["batch"] = (
                f"{best['candidate'].batch}: halved from {self.base_batch} to fit more steps"
            )
        for w in widths[1:]:
            if best["steps"] / WIDER_COST < 0.8 * 2 * TARGET_STEPS:
                self.reasons["width"] = (
                    f"width {w} would cost about {WIDER_COST:g}x per step: fewer than "
                    f"{2 * TARGET_STEPS} steps"
                )
                break
            wider = self.fitted(replace(best["candidate"], width=w))
            if wider is None or wider["steps"] < 2 * TARGET_STEPS:
                self.reasons["width"] = f"width {w} measured: fewer than {2 * TARGET_STEPS} steps"
                break
            best = self.schedule(wider["candidate"], exact=True)
            self.reasons["width"] = f"width {w}: still {best['steps']} steps (>= 2 x the target)"
        if best["steps"] < MIN_STEPS:
            self.notes.append(
                f"the budget allows only {best['steps']} steps (a run needs about "
                f"{TARGET_STEPS}): expect an unconverged model; give it about "
                f"{TARGET_STEPS * best['seconds_per_step'] / 60 / SAFETY:.0f} minutes"
            )
        return best
