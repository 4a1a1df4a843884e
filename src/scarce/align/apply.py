"""Align a whole stack with a trained aligner (``scarce align``).

1. **Pairwise fields** (:mod:`scarce.align.pairs`): for every slice z and each of its ``vote``
   neighbours towards the reference (z-1, z-2, ... after it; z+1, ... before it), the field
   ``F`` that pulls raw slice z onto the raw neighbour, optionally fine-tuned per pair under the
   training loss with defect-mask weights. They are independent: ``workers`` processes compute
   them in parallel, with the same result as one process.
2. **Composition** from ``reference`` outwards, sequentially (cheap): through neighbour n the
   candidate field of slice z is ``compose(D_n, F_{z->n})`` (warp onto the neighbour, then
   into the common frame). With several neighbours the candidates are combined by the softmin
   vote (:mod:`scarce.align.vote`), so one bad neighbour (a fold, a blank section) does not
   derail the rest; a slice whose data is mostly missing is skipped (it keeps its neighbour's
   field and is not used as a neighbour) and reported. ``drift_decay`` pulls the slow part of
   every composed field back towards the slice's own frame.
3. **Outputs**, each written to a temporary name and renamed: ``aligned.tif`` ``(Z, H, W)`` in
   the input dtype (``aligned[z] = warp(slice[z], fields[z])``; pixels without data are the
   missing value, or 0), ``fields.tif`` float32 ``(Z, 2, H, W)`` (dy, dx in pixels; zero for the
   reference), ``qc/`` (per slice: the CPC heat map against its aligned neighbour and the
   per-pixel disagreement of the vote, float32 TIFFs), ``report.json`` (per pair: seconds, CPC
   before/after, fold fraction, disagreement, skipped) and, with ``save_encodings``,
   ``encodings/z{z}_level{l}.tif`` (the encoder's feature maps, SEAMLeSS's ``inspect_enc``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scarce import atomic
from scarce.align.evaluate import chunked_pearson, cpc_summary
from scarce.align.pairs import FineTune, normalise, pairwise_fields
from scarce.align.stack import open_stack
from scarce.align.vote import decay_drift, softmin_vote
from scarce.engine.checkpoint import load_model
from scarce.engine.distributed import resolve_device
from scarce.errors import CheckpointError, InputError
from scarce.io import write_tiff
from scarce.models.field import compose, fold_fraction, warp

logger = logging.getLogger(__name__)

MOSTLY_MISSING = 0.5  # a slice with less valid data than this is skipped


def _to_dtype(aligned: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(aligned), info.min, info.max).astype(dtype)
    return aligned.astype(dtype)


def neighbours(z_count: int, reference: int, vote: int, skipped: set) -> dict[int, list[int]]:
    """For every slice but the reference, its up-to-``vote`` neighbours towards the reference,
    nearest first, never a skipped slice (when all are skipped, the nearest unskipped one)."""
    out = {}
    for z in range(z_count):
        if z == reference:
            continue
        step = -1 if z > reference else 1
        candidates = [n for n in range(z + step, reference + step, step) if n not in skipped]
        out[z] = candidates[:vote] or [reference]
    return out


def compose_stack(
    pair_fields: dict,
    near: dict,
    reference: int,
    shape,
    *,
    drift_decay=0.0,
    drift_sigma=64.0,
    temperature=1.0,
):
    """Compose pairwise fields from the reference outwards, voting over neighbours.

    Parameters
    ----------
    pair_fields : dict
        ``(z, n) -> F`` ``(1, 2, H, W)`` pulling slice z onto slice n.
    near : dict
        ``z -> [n, ...]`` (from :func:`neighbours`).
    reference : int
    shape : tuple
        ``(Z, H, W)``.

    Returns
    -------
    fields : ndarray, shape (Z, 2, H, W), float32
    disagreement : dict
        ``z -> (1, 1, H, W)`` vote disagreement, pixels.
    """
    z_count, h, w = shape
    composed = {reference: torch.zeros(1, 2, h, w)}
    disagreement = {}
    order = list(range(reference + 1, z_count)) + list(range(reference - 1, -1, -1))
    for z in order:
        candidates = torch.stack([compose(composed[n], pair_fields[(z, n)]) for n in near[z]])
        field, disagreement[z] = softmin_vote(candidates, temperature=temperature)
        composed[z] = decay_drift(field, decay=drift_decay, sigma=drift_sigma)
    fields = np.zeros((z_count, 2, h, w), np.float32)
    for z, f in composed.items():
        fields[z] = f[0].numpy()
    return fields, disagreement


def align_stack(
    model_path,
    stack,
    out_dir,
    *,
    reference: int = 0,
    fine_tune_steps: int = 0,
    missing_value: float | None = None,
    masks: np.ndarray | None = None,
    vote: int = 1,
    drift_decay: float = 0.0,
    drift_sigma: float = 64.0,
    workers: int = 1,
    tile_size: int = 1024,
    device: str = "cpu",
    save_encodings: bool = False,
    progress: bool = True,
) -> dict:
    """Align every slice of ``stack`` into the frame of slice ``reference`` (``scarce align``).

    Parameters
    ----------
    model_path : path-like
        A run folder or checkpoint of ``scarce align-train``.
    stack : path-like
        A stack (see :func:`scarce.align.stack.open_stack`); the first one if it holds several.
    out_dir : path-like
        Created if missing; receives the files listed in the module docstring.
    reference : int
        The slice that stays put.
    fine_tune_steps : int
        Adam steps per pair on the network's field (0: the network alone).
    missing_value : float, optional
        Pixels equal to it are missing data; default the training database's.
    masks : ndarray, shape (Z, H, W), optional
        Defect masks (0 normal, 1 crack, 2 fold, 3 missing), e.g. from a defect model; they
        weight the fine-tuning loss and mark missing data.
    vote : int
        Neighbours per slice (1: the previous one only; 3: SEAMLeSS's vector voting).
    drift_decay, drift_sigma : float
        Drift control (:func:`scarce.align.vote.decay_drift`); 0 = off.
    workers : int
        Processes computing pairwise fields in parallel (same result as 1).
    tile_size : int
        Slices with a side above this are aligned in overlapping tiles, pixels.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    save_encodings : bool
        Also write the encoder's feature maps of every slice.
    progress : bool
        A progress bar over pairs (off when not on a terminal).

    Returns
    -------
    dict
        The report (also ``report.json``).

    Raises
    ------
    scarce.errors.CheckpointError
        If the model is not an aligner.
    scarce.errors.InputError
        For a reference outside the stack, ``vote`` < 1 or masks of the wrong shape.
    scarce.errors.WriteError
        If the disk is full or read-only; the previous outputs are left as they were.
    """
    dev = resolve_device(device)
    net, ckpt = load_model(model_path, dev)
    if ckpt.get("task") != "align":
        raise CheckpointError(f"{ckpt.get('path')}: a {ckpt.get('task')} model, not an aligner")
    (st,) = open_stack(stack)[:1]
    if not 0 <= reference < len(st) or vote < 1:
        raise InputError(f"--reference {reference} must be in 0..{len(st) - 1}, --vote >= 1")
    if missing_value is None:
        missing_value = ckpt["extras"].get("missing_value")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.sweep_stale(out)  # what a killed run left (logged)
    raw = [st.slice(z) for z in range(len(st))]
    valid = [np.ones(r.shape, bool) if missing_value is None else r != missing_value for r in raw]
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != (len(raw), *raw[0].shape):
            raise InputError(f"defect masks {masks.shape} do not match the stack {st.shape}")
        valid = [v & (m != 3) for v, m in zip(valid, masks)]
    norm = [normalise(r.astype(np.float32), v) for r, v in zip(raw, valid)]
    skipped = {z for z, v in enumerate(valid) if v.mean() < MOSTLY_MISSING and z != reference}
    near = neighbours(len(raw), reference, vote, skipped)
    jobs = {
        (z, n): {
            "source": norm[z],
            "target": norm[n],
            "valid_s": valid[z],
            "valid_t": valid[n],
            "mask_s": None if masks is None else masks[z],
            "mask_t": None if masks is None else masks[n],
        }
        for z, ns in near.items()
        for n in ns
    }
    loss = ckpt["config"].get("loss", {})
    settings = FineTune(
        fine_tune_steps,
        loss.get("lambda_smooth", 1.0),
        loss.get("smoothness", "rigidity"),
        radius=loss.get("mask_neighborhood_radius", 20),
    )
    start = time.perf_counter()
    with tqdm(
        total=len(jobs), desc="pairs", unit="pair", disable=None if progress else True
    ) as bar:
        results = pairwise_fields(
            model_path,
            jobs,
            tile_size=tile_size,
            device=dev,
            settings=settings,
            workers=workers,
            progress=bar.update,
        )
    seconds = time.perf_counter() - start
    pair_fields = {k: f for k, (f, _) in results.items()}
    pair_seconds = {k: s for k, (_, s) in results.items()}
    fields, disagreement = compose_stack(
        pair_fields,
        near,
        reference,
        (len(raw), *raw[0].shape),
        drift_decay=drift_decay,
        drift_sigma=drift_sigma,
    )
    (out / "qc").mkdir(parents=True, exist_ok=True)
    report = _write_outputs(
        out, raw, norm, valid, fields, disagreement, near, skipped, missing_value
    )
    for row in report["pairs"]:
        row["seconds"] = round(sum(pair_seconds[(row["z"], n)] for n in row["neighbours"]), 4)
    report.update(
        stack=st.source,
        model=str(ckpt.get("path")),
        reference=reference,
        fine_tune_steps=fine_tune_steps,
        vote=vote,
        drift_decay=drift_decay,
        workers=workers,
        pair_seconds=round(seconds, 3),
        seconds_per_pair=round(seconds / max(len(jobs), 1), 4),
    )
    if save_encodings:
        _save_encodings(net, norm, out / "encodings", dev)
    atomic.write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def _write_outputs(out, raw, norm, valid, fields, disagreement, near, skipped, missing_value):
    """Warp every slice, write aligned.tif, fields.tif and the QC maps; return the report."""
    fill = 0.0 if missing_value is None else missing_value
    aligned = np.empty((len(raw), *raw[0].shape), np.float32)
    moved_norm, moved_valid = [], []
    for z, r in enumerate(raw):
        f = torch.from_numpy(fields[z])[None]
        v = (warp(torch.from_numpy(valid[z].astype(np.float32))[None, None], f) > 0.999)[0, 0]
        moved = warp(torch.from_numpy(r.astype(np.float32))[None, None], f)[0, 0]
        aligned[z] = np.where(v.numpy(), moved.numpy(), fill)
        moved_norm.append(warp(torch.from_numpy(norm[z])[None, None], f)[0, 0].numpy())
        moved_valid.append(v.numpy())
    rows = []
    for z, ns in sorted(near.items()):
        n = ns[0]
        cpc = chunked_pearson(moved_norm[z], moved_norm[n], 64, moved_valid[z] & moved_valid[n])
        before = chunked_pearson(norm[z], norm[n], 64, valid[z] & valid[n])
        d = disagreement[z][0, 0].numpy()
        write_tiff(
            out / "qc" / f"cpc_z{z:04d}.tif", cpc.astype(np.float32), photometric="minisblack"
        )
        write_tiff(
            out / "qc" / f"disagreement_z{z:04d}.tif",
            d.astype(np.float32),
            photometric="minisblack",
        )
        rows.append(
            {
                "z": z,
                "target_z": n,
                "neighbours": ns,
                "skipped": z in skipped,
                "cpc_before": cpc_summary(before)["mean"],
                "cpc_after": cpc_summary(cpc)["mean"],
                "cpc_after_p5": cpc_summary(cpc)["p5"],
                "fold_fraction": fold_fraction(torch.from_numpy(fields[z])[None]),
                "disagreement_px": float(d.mean()),
                "disagreement_over_2px": float((d > 2).mean()),
            }
        )
    write_tiff(out / "aligned.tif", _to_dtype(aligned, raw[0].dtype), photometric="minisblack")
    write_tiff(out / "fields.tif", fields, photometric="minisblack")
    return {"shape": [len(raw), *raw[0].shape], "skipped": sorted(skipped), "pairs": rows}


def _save_encodings(net, slices, folder: Path, device) -> None:
    folder.mkdir(exist_ok=True)
    m = net.size_multiple
    for z, image in enumerate(slices):
        h, w = image.shape
        padded = np.pad(image, ((0, -h % m), (0, -w % m)), mode="reflect")
        with torch.no_grad():
            encodings = net.encode(torch.from_numpy(padded)[None, None].to(device))
        for level, enc in enumerate(encodings):
            write_tiff(
                folder / f"z{z:04d}_level{level}.tif",
                enc[0].cpu().numpy(),
                photometric="minisblack",
            )


__all__ = ["align_stack", "compose_stack", "neighbours"]
