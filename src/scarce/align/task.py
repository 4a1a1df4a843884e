"""Alignment as a task of the training engine: a SEAMLeSS-style aligner trained without truth.

:class:`AlignmentTask` gives :class:`~scarce.engine.trainer.Trainer` the field network, the
pair readers of a stack database, the self-supervised loss (masked MSE of the warped source
against the target + ``lambda_smooth`` x smoothness, per open pyramid level), its evaluation
(the loss at full resolution on the test pairs, comparable across stages, and the composition
error on seeded known deformations of the test slices), checkpoint extras and plots. Training is **staged by pyramid level** as in
SEAMLeSS: stage s (``stage_steps`` steps each) opens the s+1 coarsest levels, a newly opened
level starts from the weights of the level above where their shapes match, and the last stage
trains all levels at ``finetune_lr_factor`` x the learning rate. A run whose field collapses
to the identity (mean magnitude under ``collapse_px`` while the similarity stays at the
identity's, ``collapse_patience`` evaluations in a row) ends with stop reason ``collapse``.
:func:`align_train` (``scarce align-train``) builds one and runs the engine.

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019); seung-lab/SEAMLeSS ``training/train.py``
(staged training, ``fine_tuning_lr_factor`` 0.2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from scarce import atomic
from scarce.align.config import AlignConfig
from scarce.align.evaluate import (
    chunked_pearson,
    composition_error,
    flow_colours,
    overlay,
    random_deformation,
)
from scarce.align.losses import full_loss, masked_mse, pair_loss
from scarce.align.readers import make_pair_loader, stack_metadata, valid_mask
from scarce.data.store import SampleStore
from scarce.engine import distributed
from scarce.engine.runlog import open_run
from scarce.engine.task import Evaluation, Runtime
from scarce.engine.trainer import Trainer
from scarce.models import build_model
from scarce.models.field import fold_fraction, upsample, warp

logger = logging.getLogger("scarce")

ERROR_BINS = np.linspace(0.0, 100.0, 4001)  # composition-error histogram edges, pixels


class AlignmentTask:
    """Train a field network on the consecutive slices of a stack database.

    Parameters
    ----------
    train_db, test_db : path-like
        ``train.lmdb`` / ``test.lmdb`` from ``scarce ingest-stack`` (``test_db`` may be None).
    cfg : AlignConfig, optional

    Raises
    ------
    scarce.errors.StoreError
        If ``train_db`` is not a stack database.
    """

    name = "align"
    headline = "composition_error_px"
    partial_forward = True
    columns = (
        "similarity",
        "identity_similarity",
        "mean_field_px",
        "composition_error_px",
        "composition_p95_px",
        "fold_fraction",
        "cpc",
    )

    def __init__(self, train_db, test_db=None, cfg: AlignConfig | None = None):
        self.cfg = cfg or AlignConfig()
        self.train_db = Path(train_db)
        self.test_db = Path(test_db) if test_db else None
        self.metadata = stack_metadata(self.train_db)
        self.samples_per_batch = self.cfg.data.batch_size
        self.model = None
        self.collapsed = 0
        self._test = None

    # --------------------------------------------------------------------- training
    def build_model(self) -> torch.nn.Module:
        """The configured :class:`~scarce.models.fieldnet.FieldNet` for 1-channel slices."""
        m = self.cfg.model
        self.model = build_model(
            m.name,
            1,
            levels=m.levels,
            encoder_widths=m.encoder_widths,
            aligner_widths=m.aligner_widths,
            kernel_size=m.kernel_size,
            finest_level=m.finest_level,
            correlation_radius=m.correlation_radius,
            smoothing=m.smoothing,
            match_temperature=m.match_temperature,
            input_level=m.input_level,
            match_channels=m.match_channels,
            coarse_affine=m.coarse_affine,
            refine=m.refine,
            finest_iterations=m.finest_iterations,
        )
        self.model.open_levels = 1  # stage 0; loss() opens the rest as training goes on
        return self.model

    def describe(self) -> str:
        """Database, pairs, levels and stages."""
        m, d = self.cfg.model, self.cfg.data
        return (
            f"{self.train_db}: {len(self.metadata['pairs'])} pairs, {m.levels} levels "
            f"(finest {m.finest_level}), {self.stages} stages of {self.cfg.stage.stage_steps} "
            f"steps, batch {d.batch_size}, patch {d.patch_size}"
        )

    @property
    def stages(self) -> int:
        """Number of stages: one per level from the coarsest to ``finest_level``."""
        return self.cfg.model.levels - self.cfg.model.finest_level

    def stage_of(self, step: int) -> int:
        """The stage at ``step`` (0 = coarsest level alone; the last opens every level)."""
        return min(step // self.cfg.stage.stage_steps, self.stages - 1)

    def lr_factor(self, step: int) -> float:
        """``finetune_lr_factor`` in the last stage (all levels open), else 1."""
        last = self.stages > 1 and self.stage_of(step) == self.stages - 1
        return self.cfg.stage.finetune_lr_factor if last else 1.0

    def train_batches(self, rank: int, start_batch: int):
        """The pair readers' batch stream from ``start_batch`` (:mod:`scarce.align.readers`)."""
        return make_pair_loader(self.train_db, self.cfg, rank=rank, start_batch=start_batch)

    def _open(self, step: int) -> None:
        """Open the levels of ``step``'s stage; a newly opened level copies the one above."""
        net, stage = self.model, self.stage_of(step)
        wanted = stage + 1
        if wanted > net.open_levels and step % self.cfg.stage.stage_steps == 0 and step > 0:
            new = net.levels - wanted  # the level being opened
            above, below = net.aligners[new + 1].state_dict(), net.aligners[new]
            same = {k: v for k, v in above.items() if below.state_dict()[k].shape == v.shape}
            below.load_state_dict(same, strict=False)
            logger.info("stage %d: level %d opened at step %d", stage, new, step)
        net.open_levels = wanted

    def loss(self, forward, batch: dict, runtime: Runtime, step: int) -> torch.Tensor:
        """:func:`pair_loss` of the network's fields for the batch's (augmented) inputs."""
        self._open(step)
        dev = runtime.device
        b = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with runtime.autocast():
            fields = forward(b["source_input"], b["target_input"])
        fields = {k: v.float() for k, v in fields.items()}
        return pair_loss(
            fields, b["source"], b["target"], b["source_valid"], b["target_valid"], self.cfg
        )

    # ------------------------------------------------------------------- evaluation
    def _test_pairs(self) -> list[tuple]:
        """Centre crops of the test pairs, normalised: ``(name, source, target, vs, vt)``."""
        if self._test is None:
            meta, size = stack_metadata(self.test_db), self.cfg.data.test_size
            pairs = []
            with SampleStore(self.test_db) as st:
                for s_idx, t_idx in meta["pairs"]:
                    crops = []
                    for i in (s_idx, t_idx):
                        sample, stats = st[i], meta["slice_stats"][i]
                        image = (sample.image[0].astype(np.float32) - stats["mean"]) / stats["std"]
                        valid = valid_mask(sample.image, meta.get("missing_value"))
                        crops += [_centre(image * valid, size), _centre(valid, size)]
                    pairs.append((st[s_idx].name, crops[0], crops[2], crops[1], crops[3]))
            self._test = pairs
        return self._test

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime) -> Evaluation | None:
        """Test loss, similarity vs identity, composition error on known deformations, folds.

        Each rank takes every ``world_size``-th test pair; sums and the error histogram are
        reduced over ranks. The known deformations are seeded by the pair index only, so
        every evaluation of every run sees the same ones.
        """
        if self.test_db is None:
            return None
        dist, dev, d = runtime.dist, runtime.device, self.cfg.data
        sums = torch.zeros(8, dtype=torch.float64)  # loss, sim, ident, |D|, folds, cpc, n, cpc_n
        hist = torch.zeros(len(ERROR_BINS) - 1, dtype=torch.float64)
        examples = []
        for i, (name, src, tgt, vs, vt) in enumerate(self._test_pairs()):
            if i % dist.world_size != dist.rank:
                continue
            s, t, ms, mt = (torch.from_numpy(a)[None, None].to(dev) for a in (src, tgt, vs, vt))
            with runtime.autocast():
                fields = model(s, t)
            fields = {k: v.float() for k, v in fields.items()}
            field = _full(fields)
            moved = warp(s, field)
            weight = mt * (warp(ms, field) > 0.999).float()
            r = chunked_pearson(moved[0, 0].cpu(), tgt, 32, (weight[0, 0] > 0).cpu().numpy())
            sums += torch.tensor(
                [
                    float(full_loss(field, s, t, ms, mt, self.cfg)),
                    float(masked_mse(moved, t, weight)),
                    float(masked_mse(s, t, mt * ms)),
                    float(field.norm(dim=1).mean()),
                    fold_fraction(field),
                    float(np.nansum(r)),
                    1.0,
                    float(np.isfinite(r).sum()),
                ],
                dtype=torch.float64,
            )
            for k in range(d.test_deformations):
                u = random_deformation(
                    tgt.shape, d.test_amplitude, np.random.default_rng([i, k])
                ).to(dev)
                deformed = warp(t, u)
                inner = _interior(tgt.shape, d.test_amplitude, dev)
                with runtime.autocast():
                    predicted = model(deformed, t)
                predicted = _full({lv: f.float() for lv, f in predicted.items()})
                err = composition_error(predicted, u)
                hist += torch.histogram(
                    err[0][inner].cpu().double().clamp(max=99.99), torch.as_tensor(ERROR_BINS)
                )[0].double()
            if len(examples) < self.cfg.plot_test_images:
                examples.append((name, src, tgt, moved[0, 0].cpu().numpy(), field[0].cpu().numpy()))
        stats = distributed.all_reduce_sum(torch.cat([sums, hist]).to(dev), dist).cpu()
        sums, hist = stats[:8], stats[8:]
        n = max(float(sums[6]), 1.0)
        mean_err, p95 = _histogram_stats(hist)
        metrics = {
            "similarity": float(sums[1]) / n,
            "identity_similarity": float(sums[2]) / n,
            "mean_field_px": float(sums[3]) / n,
            "composition_error_px": mean_err,
            "composition_p95_px": p95,
            "fold_fraction": float(sums[4]) / n,
            "cpc": float(sums[5]) / max(float(sums[7]), 1.0),
        }
        return Evaluation(float(sums[0]) / n, metrics, examples, self._collapse(metrics))

    def _collapse(self, m: dict) -> str | None:
        """Count evaluations that look collapsed; ``"collapse"`` after the patience."""
        st = self.cfg.stage
        collapsed = (
            m["mean_field_px"] < st.collapse_px
            and m["similarity"] >= 0.99 * m["identity_similarity"]
        )
        self.collapsed = self.collapsed + 1 if collapsed else 0
        if self.collapsed < st.collapse_patience:
            return None
        logger.warning(
            "The aligner has collapsed to the identity: mean field %.3f px (< %.2f) and test "
            "similarity %.4f, no better than without alignment (%.4f), for %d evaluations. "
            "Lower loss.lambda_smooth (now %g) or optim.learning_rate (now %g), and check that "
            "the slices overlap.",
            m["mean_field_px"],
            st.collapse_px,
            m["similarity"],
            m["identity_similarity"],
            self.collapsed,
            self.cfg.loss.lambda_smooth,
            self.cfg.optim.learning_rate,
        )
        return "collapse"

    def checkpoint_extras(self) -> dict:
        """What ``scarce align`` needs: normalisation rule and the missing value."""
        return {
            "normalization": "per-slice z-score over valid pixels",
            "missing_value": self.metadata.get("missing_value"),
            "levels": self.cfg.model.levels,
        }

    def plot(self, plots_dir: Path, step: int, examples: list) -> Path | None:
        """``plots_dir/step_XXXXX.png``: per test pair the overlay before and after, the field."""
        if not examples:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
        for row, (name, src, tgt, moved, field) in zip(axes, examples):
            panels = (overlay(src, tgt), overlay(moved, tgt), flow_colours(field))
            titles = (
                f"{name}: before",
                "after (red src, green tgt)",
                f"field, max {np.hypot(*field).max():.1f} px",
            )
            for ax, image, title in zip(row, panels, titles):
                ax.imshow(image)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        path = Path(plots_dir) / f"step_{step:05d}.png"
        with atomic.atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=60, format="png")
        plt.close(fig)
        return path


def _full(fields: dict) -> torch.Tensor:
    """The finest field at full resolution."""
    level = min(fields)
    return upsample(fields[level], 2**level) if level else fields[level]


def _centre(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape
    size_h, size_w = min(size, h - h % 32), min(size, w - w % 32)
    y0, x0 = (h - size_h) // 2, (w - size_w) // 2
    return np.ascontiguousarray(array[y0 : y0 + size_h, x0 : x0 + size_w], dtype=np.float32)


def _interior(shape, margin: float, device) -> torch.Tensor:
    """Pixels at least ``margin`` from the border (their content stays inside the crop)."""
    m = int(np.ceil(margin)) + 1
    inner = torch.zeros(shape, dtype=torch.bool, device=device)
    inner[m:-m, m:-m] = True
    return inner


def _histogram_stats(hist: torch.Tensor) -> tuple[float | None, float | None]:
    total = float(hist.sum())
    if total == 0:
        return None, None
    centres = (ERROR_BINS[:-1] + ERROR_BINS[1:]) / 2
    mean = float((hist.numpy() * centres).sum() / total)
    p95 = float(centres[np.searchsorted(np.cumsum(hist.numpy()), 0.95 * total)])
    return mean, p95


def align_train(train_db, test_db, run_dir, cfg: AlignConfig | None = None, **options) -> dict:
    """Train an aligner and return the run summary (``scarce align-train``).

    Parameters
    ----------
    train_db, test_db : path-like
        Stack databases (``scarce ingest-stack``); ``test_db`` may be None.
    run_dir : path-like
        The run folder.
    cfg : AlignConfig, optional
        On ``resume`` only ``max_steps``, ``max_minutes`` and ``early_stopping`` are read.
    **options
        ``resume``, ``init_from`` (fine-tune a trained aligner on a new stack) and
        ``overwrite``, as for :func:`scarce.segment.task.train`.

    Returns
    -------
    dict
        The engine's run summary.
    """
    resume, overwrite = options.pop("resume", False), options.pop("overwrite", False)
    cfg, ckpt = open_run(run_dir, cfg or AlignConfig(), resume=resume, overwrite=overwrite)
    task = AlignmentTask(train_db, test_db, cfg)
    return Trainer(task, run_dir, resume_from=ckpt, overwrite=overwrite, **options).fit()


__all__ = ["AlignmentTask", "align_train"]
