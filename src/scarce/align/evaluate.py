"""Honest alignment metrics: error against known deformations, and image similarity.

Image similarity alone rewards over-warping (a field that tears the source to match the
target's noise scores well), so Scarce measures aligners against **known** deformations: a
target slice is deformed by a seeded smooth field ``u`` (:func:`random_deformation`), and the
aligner's field ``D`` for (``warp(target, u)`` -> target) is scored by the **composition
error** ``|D(x) + u(x + D(x))|`` (:func:`composition_error`; zero for the exact answer).
Similarity is reported as the chunked Pearson correlation (CPC) of SEAMLeSS
(:func:`chunked_pearson`) and as normalised cross-correlation (:func:`ncc`); folds as the
fraction of pixels with ``det(I + grad D) <= 0``.

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019), Table 1 (chunked Pearson correlation between
consecutive aligned sections); seung-lab/metroem ``helpers.py`` (CPC on chunks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scarce import atomic
from scarce.models.field import compose


def random_deformation(
    shape: tuple[int, int],
    amplitude: float,
    rng: np.random.Generator,
    *,
    grid: int = 4,
) -> torch.Tensor:
    """A smooth, fold-free random field whose largest displacement is ``amplitude`` pixels.

    The sum of a translation (uniform direction), an affine part (rotation up to 2 degrees
    and scale 1 +- 2 % about the centre) and a smooth part (Gaussian displacements on a
    ``grid`` x ``grid`` lattice, bicubically upsampled), each of the same order, rescaled so
    that ``max |u| == amplitude``. With amplitude 32 px on 512 px the largest local
    stretch stays well below 1, so the field does not fold.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)``, pixels.
    amplitude : float
        Largest displacement, pixels (> 0).
    rng : numpy.random.Generator
    grid : int
        Lattice points per axis of the smooth part.

    Returns
    -------
    Tensor, shape (1, 2, H, W), float32, pixels (dy, dx)
    """
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    angle, scale = np.radians(rng.uniform(-2, 2)), 1.0 + rng.uniform(-0.02, 0.02)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    affine = np.stack([(c - 1) * yy - s * xx, s * yy + (c - 1) * xx])  # (2, H, W)
    coarse = torch.from_numpy(rng.normal(0.0, 1.0, (1, 2, grid, grid)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].numpy()
    theta = rng.uniform(0, 2 * np.pi)
    parts = [np.array([np.sin(theta), np.cos(theta)])[:, None, None] * np.ones((2, h, w))]
    parts += [affine, smooth]
    field = sum(p / max(np.abs(np.linalg.norm(p, axis=0)).max(), 1e-9) for p in parts)
    field *= amplitude / np.linalg.norm(field, axis=0).max()
    return torch.from_numpy(field.astype(np.float32))[None]


def composition_error(
    predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pixel ``|D(x) + u(x + D(x))|`` in pixels: how far the aligned pixel is from home.

    Parameters
    ----------
    predicted : Tensor, shape (N, 2, H, W)
        The aligner's field ``D`` (pulls the source onto the target).
    truth : Tensor, shape (N, 2, H, W)
        The known deformation ``u`` that made the source: ``source = warp(target, u)``.
    valid : Tensor, shape (N, H, W), optional
        Pixels to keep; others are NaN.

    Returns
    -------
    Tensor, shape (N, H, W), float32
    """
    err = torch.linalg.vector_norm(compose(predicted, truth), dim=1)
    if valid is not None:
        err = torch.where(valid.bool(), err, torch.full_like(err, float("nan")))
    return err


def error_summary(errors: torch.Tensor | np.ndarray) -> dict:
    """Mean, median, p95 and the share above 1 and 2 px of an error map (NaNs skipped)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {k: None for k in ("mean_px", "median_px", "p95_px", "over_1px", "over_2px")}
    return {
        "mean_px": float(e.mean()),
        "median_px": float(np.median(e)),
        "p95_px": float(np.percentile(e, 95)),
        "over_1px": float((e > 1).mean()),
        "over_2px": float((e > 2).mean()),
    }


def ncc(a, b, valid=None) -> float:
    """Normalised cross-correlation of two images over the valid pixels (Pearson r)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if valid is not None:
        keep = np.asarray(valid, bool).ravel()
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def chunked_pearson(a, b, chunk: int = 64, valid=None) -> np.ndarray:
    """Pearson correlation of each non-overlapping ``chunk`` x ``chunk`` block of two images.

    Parameters
    ----------
    a, b : array_like, shape (H, W)
    chunk : int
        Block side, pixels; partial blocks at the right and bottom edges are dropped.
    valid : array_like of bool, shape (H, W), optional
        Blocks with any invalid pixel are NaN (dropped from statistics).

    Returns
    -------
    ndarray, shape (H // chunk, W // chunk), float64
        ``r`` per block; NaN where a block is flat or has invalid pixels.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    gh, gw = a.shape[0] // chunk, a.shape[1] // chunk

    def blocks(x):
        return x[: gh * chunk, : gw * chunk].reshape(gh, chunk, gw, chunk).swapaxes(1, 2)

    ba, bb = blocks(a), blocks(b)
    ba = ba - ba.mean(axis=(2, 3), keepdims=True)
    bb = bb - bb.mean(axis=(2, 3), keepdims=True)
    den = np.sqrt((ba * ba).sum(axis=(2, 3)) * (bb * bb).sum(axis=(2, 3)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (ba * bb).sum(axis=(2, 3)) / den, np.nan)
    if valid is not None:
        complete = blocks(np.asarray(valid, bool)).all(axis=(2, 3))
        r = np.where(complete, r, np.nan)
    return r


def cpc_summary(values) -> dict:
    """SEAMLeSS Table 1 statistics of chunk correlations: mean, variance, 1/5/95/99th pct."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {k: None for k in ("mean", "variance", "p1", "p5", "p95", "p99", "chunks")}
    p = np.percentile(v, (1, 5, 95, 99))
    return {
        "mean": float(v.mean()),
        "variance": float(v.var()),
        "p1": float(p[0]),
        "p5": float(p[1]),
        "p95": float(p[2]),
        "p99": float(p[3]),
        "chunks": int(v.size),
    }


def flow_colours(field) -> np.ndarray:
    """A field ``(2, H, W)`` as an RGB image ``(H, W, 3)`` in [0, 1]: hue = direction,
    saturation = magnitude relative to the largest (the usual optical-flow colour wheel)."""
    import matplotlib.colors

    f = np.asarray(field, np.float64)
    mag = np.hypot(f[0], f[1])
    hue = (np.arctan2(f[0], f[1]) / (2 * np.pi)) % 1.0
    sat = mag / max(mag.max(), 1e-9)
    return matplotlib.colors.hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], -1))


def overlay(source, target) -> np.ndarray:
    """Red = source, green = target, ``(H, W, 3)`` in [0, 1] (yellow where they agree)."""

    def unit(x):
        x = np.asarray(x, np.float64)
        lo, hi = np.percentile(x, (1, 99))
        return np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)

    s, t = unit(source), unit(target)
    return np.stack([s, t, np.zeros_like(s)], -1)


def _read_fields(path, what: str, shape) -> np.ndarray:
    import tifffile

    from scarce.errors import InputError

    fields = np.asarray(tifffile.imread(path), dtype=np.float32)
    if (
        fields.ndim != 4
        or fields.shape[1] != 2
        or fields.shape[0] != shape[0]
        or (fields.shape[2:] != tuple(shape[1:]))
    ):
        raise InputError(
            f"{path}: {what} must be (Z, 2, H, W) = ({shape[0]}, 2, {shape[1]}, "
            f"{shape[2]}), got {fields.shape}"
        )
    return fields


def evaluate_stack(
    stack,
    out_dir=None,
    *,
    fields=None,
    truth_fields=None,
    chunk: int = 64,
    missing_value: float | None = None,
    before=None,
    pictures: int = 3,
) -> dict:
    """Evaluate an aligned stack (``scarce align-evaluate``).

    Parameters
    ----------
    stack : path-like
        The aligned stack (e.g. ``OUT/aligned.tif``).
    out_dir : path-like, optional
        Writes ``metrics.json`` and PNGs: red-green overlays of the first ``pictures`` pairs
        (and of the unaligned pairs with ``before``), a CPC heat map per pair, each field as a
        colour wheel.
    fields : path-like, optional
        ``fields.tif`` from ``scarce align`` (fold fraction, and with ``truth_fields`` the
        composition error).
    truth_fields : path-like, optional
        ``(Z, 2, H, W)`` known deformations ``u`` that made each slice (``slice = warp(
        original, u)``); the composition error ``|D(x) + u(x + D(x))|`` is reported.
    chunk : int
        CPC block side, pixels; blocks with a missing pixel are dropped.
    missing_value : float, optional
        Pixels equal to it are missing.
    before : path-like, optional
        The unaligned stack, for the CPC before alignment and the "before" overlays.

    Returns
    -------
    dict
        ``cpc`` (SEAMLeSS Table 1 statistics over every block of every consecutive pair),
        ``cpc_before``, ``per_pair`` rows, ``fold_fraction`` and ``composition_error``.
    """
    from scarce.align.stack import open_stack
    from scarce.models.field import fold_fraction

    (st,) = open_stack(stack)[:1]
    images = np.stack([st.slice(z).astype(np.float32) for z in range(len(st))])
    valid = np.ones(images.shape, bool) if missing_value is None else images != missing_value
    rows, blocks = [], []
    for z in range(1, len(images)):
        r = chunked_pearson(images[z], images[z - 1], chunk, valid[z] & valid[z - 1])
        blocks.append(r)
        rows.append({"z": z, "cpc": cpc_summary(r)["mean"]})
    result = {
        "stack": str(stack),
        "chunk": chunk,
        "cpc": cpc_summary(np.concatenate([b.ravel() for b in blocks])),
        "per_pair": rows,
    }
    if before is not None:
        (bst,) = open_stack(before)[:1]
        raw = np.stack([bst.slice(z).astype(np.float32) for z in range(len(bst))])
        prior = [chunked_pearson(raw[z], raw[z - 1], chunk) for z in range(1, len(raw))]
        result["cpc_before"] = cpc_summary(np.concatenate([b.ravel() for b in prior]))
    field_stack = None
    if fields is not None:
        field_stack = _read_fields(fields, "fields", images.shape)
        folds = [fold_fraction(torch.from_numpy(f)[None]) for f in field_stack]
        result["fold_fraction"] = float(np.mean(folds))
        for row, f in zip(rows, folds[1:]):
            row["fold_fraction"] = f
    if truth_fields is not None:
        if field_stack is None:
            from scarce.errors import InputError

            raise InputError("--truth-fields needs --fields (the aligner's fields)")
        truth = _read_fields(truth_fields, "truth fields", images.shape)
        errors = [
            composition_error(torch.from_numpy(d)[None], torch.from_numpy(u)[None])[0]
            for d, u in zip(field_stack, truth)
        ]
        result["composition_error"] = error_summary(torch.stack(errors))
        for row, e in zip(rows, errors[1:]):
            row["composition_error_px"] = float(e.mean())
    if out_dir is not None:
        _write_report(Path(out_dir), result, images, blocks, field_stack, before, pictures)
    return result


def _write_report(out: Path, result, images, blocks, fields, before, pictures) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scarce.align.stack import open_stack

    out.mkdir(parents=True, exist_ok=True)
    raw = None
    if before is not None:
        (bst,) = open_stack(before)[:1]
        raw = [bst.slice(z) for z in range(min(len(bst), pictures + 1))]
    for z in range(1, min(len(images), pictures + 1)):
        panels = [("after", overlay(images[z], images[z - 1]))]
        if raw is not None:
            panels.insert(0, ("before", overlay(raw[z], raw[z - 1])))
        panels.append(("CPC per block", blocks[z - 1]))
        if fields is not None:
            panels.append(
                (f"field, max {np.hypot(*fields[z]).max():.1f} px", flow_colours(fields[z]))
            )
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
        for ax, (title, image) in zip(axes[0], panels):
            shown = ax.imshow(
                image,
                vmin=-1 if image.ndim == 2 else None,
                vmax=1 if image.ndim == 2 else None,
                cmap="viridis" if image.ndim == 2 else None,
            )
            if image.ndim == 2:
                fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(f"z {z} -> {z - 1}: {title}", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        with atomic.atomic_output(out / f"pair_{z:04d}.png") as tmp:
            fig.savefig(tmp, dpi=70, format="png")
        plt.close(fig)
    atomic.write_text(out / "metrics.json", json.dumps(result, indent=2))


__all__ = [
    "chunked_pearson",
    "composition_error",
    "cpc_summary",
    "error_summary",
    "evaluate_stack",
    "flow_colours",
    "ncc",
    "overlay",
    "random_deformation",
]
