"""Align a whole stack with a trained aligner (``scarce align``).

Slice ``reference`` stays put. Each later slice z is aligned to the already aligned slice
z - 1 (earlier slices to z + 1, backwards), so ``aligned[z] = warp(slice[z], fields[z])``:
every field pulls the *original* slice into the common frame, and no field is composed. The
network's field can be refined per pair by a few Adam steps on the pixel field under the
training loss (``fine_tune_steps``; metroem's online fine-tuning). Slices larger than
``tile_size`` go through the engine's sliding window (the fields of overlapping tiles are
blended). Pixels equal to ``missing_value`` are missing data: never matched, and filled with
that value in the output (as is everything pulled from outside a slice).

Outputs (each written to a temporary name, then renamed): ``aligned.tif`` ``(Z, H, W)`` in the
input dtype, ``fields.tif`` float32 ``(Z, 2, H, W)`` (dy, dx in pixels; zero for the
reference), ``report.json`` (per pair: seconds, CPC before/after, fold fraction) and, with
``save_encodings``, ``encodings/z{z}_level{l}.tif`` (the encoder's feature maps,
SEAMLeSS's ``inspect_enc``).

References
----------
seung-lab/metroem ``aligner.py`` / ``finetuner.py`` (per-pair fine-tuning: Adam on the pixel
field, lr 0.1, smoothness-regularised similarity).
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
from scarce.align.losses import masked_mse, smoothness
from scarce.align.stack import open_stack
from scarce.engine.checkpoint import load_model
from scarce.engine.distributed import resolve_device
from scarce.engine.tiling import sliding_window_logits
from scarce.errors import CheckpointError, InputError
from scarce.io import write_tiff
from scarce.models.field import fold_fraction, warp

logger = logging.getLogger(__name__)


class PairField(torch.nn.Module):
    """A field network as a 2-channel image model for the sliding window: ``(N, 2, H, W)``
    ``[source, target]`` in, the field ``(N, 2, H, W)`` out."""

    in_channels = 2

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.size_multiple, self.halo = net.size_multiple, net.halo

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net.field(pair[:, :1], pair[:, 1:])


def normalise(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-slice z-score over valid pixels, 0 elsewhere (as the aligner was trained)."""
    values = image[valid].astype(np.float64)
    mean, std = (values.mean(), max(values.std(), 1e-6)) if values.size else (0.0, 1.0)
    return np.where(valid, (image - mean) / std, 0.0).astype(np.float32)


def pair_field(net, source, target, *, tile_size: int, device) -> torch.Tensor:
    """The network's field ``(1, 2, H, W)`` for ``(H, W)`` float32 slices (tiled if large).

    Slices are padded by reflection to a multiple of ``net.size_multiple``; the field is
    cropped back.
    """
    h, w = source.shape
    m = net.size_multiple
    if max(h, w) <= tile_size:
        ph, pw = -h % m, -w % m
        pad = ((0, ph), (0, pw))
        s = torch.from_numpy(np.pad(source, pad, mode="reflect"))[None, None].to(device)
        t = torch.from_numpy(np.pad(target, pad, mode="reflect"))[None, None].to(device)
        with torch.no_grad():
            return net.field(s, t)[..., :h, :w].cpu()
    pair = torch.from_numpy(np.stack([source, target]))
    field = sliding_window_logits(
        PairField(net), pair, tile_size=tile_size, overlap=0.5, batch_size=1, device=device
    )
    return field[None]


def fine_tune(
    field,
    source,
    target,
    valid_s,
    valid_t,
    *,
    steps: int,
    lambda_smooth: float,
    smoothness_kind: str,
    lr: float = 0.1,
) -> torch.Tensor:
    """Refine a field by Adam steps on ``masked_mse(warp(source, D), target) + lambda x
    smoothness(D)``; the learning rate halves after 20 steps without improvement.

    Parameters
    ----------
    field : Tensor, shape (1, 2, H, W), pixels
        Start (the network's output).
    source, target, valid_s, valid_t : Tensor, shape (1, 1, H, W)
    steps : int
    lambda_smooth : float
    smoothness_kind : str
    lr : float
        Adam learning rate, pixels per step (metroem: 0.1).

    Returns
    -------
    Tensor, shape (1, 2, H, W)
        The best field seen.
    """
    d = field.clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=lr)
    best, best_loss, stale = field.clone(), float("inf"), 0
    for _ in range(steps):
        weight = valid_t * (warp(valid_s, d.detach()) > 0.999).float()
        loss = masked_mse(warp(source, d), target, weight)
        loss = loss + lambda_smooth * smoothness(d, smoothness_kind)
        if float(loss.detach()) < best_loss - 1e-6:
            best, best_loss, stale = d.detach().clone(), float(loss.detach()), 0
        else:
            stale += 1
            if stale >= 20:
                for group in opt.param_groups:
                    group["lr"] /= 2
                stale = 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best


def _to_dtype(aligned: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(aligned), info.min, info.max).astype(dtype)
    return aligned.astype(dtype)


def _cpc(a, b, valid) -> float | None:
    return cpc_summary(chunked_pearson(a, b, 64, valid))["mean"]


def align_stack(
    model_path,
    stack,
    out_dir,
    *,
    reference: int = 0,
    fine_tune_steps: int = 0,
    missing_value: float | None = None,
    tile_size: int = 1024,
    device: str = "auto",
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
    tile_size : int
        Slices with a side above this are aligned in overlapping tiles, pixels.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    save_encodings : bool
        Also write the encoder's feature maps of every slice.
    progress : bool
        A progress bar over slices (off when not on a terminal).

    Returns
    -------
    dict
        The report (also ``report.json``): ``pairs`` (one row per aligned slice: ``z``,
        ``target_z``, ``seconds``, ``cpc_before``, ``cpc_after``, ``fold_fraction``), totals.

    Raises
    ------
    scarce.errors.CheckpointError
        If the model is not an aligner.
    scarce.errors.InputError
        For a reference outside the stack.
    scarce.errors.WriteError
        If the disk is full or read-only; the previous outputs are left as they were.
    """
    dev = resolve_device(device)
    net, ckpt = load_model(model_path, dev)
    if ckpt.get("task") != "align":
        raise CheckpointError(f"{ckpt.get('path')}: a {ckpt.get('task')} model, not an aligner")
    cfg = ckpt["config"]
    (st,) = open_stack(stack)[:1]
    if not 0 <= reference < len(st):
        raise InputError(f"--reference {reference} is outside the stack (0..{len(st) - 1})")
    if missing_value is None:
        missing_value = ckpt["extras"].get("missing_value")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.sweep_stale(out)  # what a killed run left (logged)
    raw = [st.slice(z) for z in range(len(st))]
    valid = [np.ones(r.shape, bool) if missing_value is None else r != missing_value for r in raw]
    norm = [normalise(r.astype(np.float32), v) for r, v in zip(raw, valid)]
    z_count, (h, w) = len(raw), raw[0].shape
    fields = np.zeros((z_count, 2, h, w), np.float32)
    aligned_norm, aligned_valid = list(norm), list(valid)
    aligned = np.array(raw, dtype=np.float32)
    order = [(z, z - 1) for z in range(reference + 1, z_count)]
    order += [(z, z + 1) for z in range(reference - 1, -1, -1)]
    rows = []
    loss_cfg = cfg.get("loss", {})
    for z, target_z in tqdm(order, desc="slices", unit="slice", disable=None if progress else True):
        start = time.perf_counter()
        src, tgt = norm[z], aligned_norm[target_z]
        field = pair_field(net, src, tgt, tile_size=tile_size, device=dev)
        s, t = torch.from_numpy(src)[None, None], torch.from_numpy(tgt)[None, None]
        vs = torch.from_numpy(valid[z].astype(np.float32))[None, None]
        vt = torch.from_numpy(aligned_valid[target_z].astype(np.float32))[None, None]
        if fine_tune_steps:
            field = fine_tune(
                field,
                s,
                t,
                vs,
                vt,
                steps=fine_tune_steps,
                lambda_smooth=loss_cfg.get("lambda_smooth", 1.0),
                smoothness_kind=loss_cfg.get("smoothness", "rigidity"),
            )
        moved_valid = (warp(vs, field) > 0.999)[0, 0].numpy()
        aligned_norm[z] = np.where(moved_valid, warp(s, field)[0, 0].numpy(), 0.0)
        aligned_valid[z] = moved_valid
        moved_raw = warp(torch.from_numpy(raw[z].astype(np.float32))[None, None], field)[0, 0]
        fill = 0.0 if missing_value is None else missing_value
        aligned[z] = np.where(moved_valid, moved_raw.numpy(), fill)
        fields[z] = field[0].numpy()
        both_before, both_after = valid[z] & valid[target_z], moved_valid & aligned_valid[target_z]
        rows.append(
            {
                "z": z,
                "target_z": target_z,
                "seconds": round(time.perf_counter() - start, 3),
                "cpc_before": _cpc(norm[z], tgt, both_before),
                "cpc_after": _cpc(aligned_norm[z], tgt, both_after),
                "fold_fraction": fold_fraction(field),
            }
        )
    write_tiff(out / "aligned.tif", _to_dtype(aligned, raw[0].dtype), photometric="minisblack")
    write_tiff(out / "fields.tif", fields, photometric="minisblack")
    if save_encodings:
        _save_encodings(net, norm, out / "encodings", dev)
    report = {
        "stack": st.source,
        "model": str(ckpt.get("path")),
        "reference": reference,
        "fine_tune_steps": fine_tune_steps,
        "shape": [z_count, h, w],
        "pairs": rows,
        "seconds": round(sum(r["seconds"] for r in rows), 3),
    }
    atomic.write_text(out / "report.json", json.dumps(report, indent=2))
    return report


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


__all__ = ["PairField", "align_stack", "fine_tune", "normalise", "pair_field"]
