"""Split source images into train and test: by a seeded rule, or as a ``split.json`` says.

Rules where the issue left a choice: stems sorted, shuffled with
``np.random.default_rng(seed)``; the first ``round_half_up((1 - train_fraction) * n)`` shuffled
stems are test, but at least 1 test and 1 train image when ``train_fraction < 1`` and
``n >= 2``. A single image always goes to train (a warning says there is no test set). A given
split must name every stem exactly once and nothing else; a name that is a path (a separator,
``..``, an absolute path) is refused: a split names files inside the data folders, never
anything outside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

__all__ = ["load_split", "split_stems"]


def split_stems(stems, train_fraction: float = 0.8, seed: int = 0) -> dict[str, list[str]]:
    """Split source images into train and test, reproducibly.

    Parameters
    ----------
    stems : iterable of str
        Source image stems (order does not matter: they are sorted first).
    train_fraction : float
        In ``(0, 1]``. ``1`` puts everything in train.
    seed : int
        Seed of ``numpy.random.default_rng`` for the shuffle.

    Returns
    -------
    dict
        ``{"train": [stems], "test": [stems]}``, each sorted. The test set has
        ``round_half_up((1 - train_fraction) * n)`` stems, clipped to ``1 .. n - 1`` when
        ``train_fraction < 1`` and ``n >= 2``; with ``n == 1`` the image goes to train.

    Raises
    ------
    ValueError
        If ``train_fraction`` is not in ``(0, 1]``.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    stems = sorted(stems)
    n = len(stems)
    n_test = 0
    if train_fraction < 1 and n >= 2:
        n_test = min(max(math.floor((1 - train_fraction) * n + 0.5), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    test = {stems[i] for i in order[:n_test]}
    return {"train": [s for s in stems if s not in test], "test": [s for s in stems if s in test]}


def load_split(split, stems: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Check a given split (a ``split.json`` path or a dict) against the paired stems.

    Parameters
    ----------
    split : path-like or dict
        ``{"train": [stems], "test": [stems]}`` with exactly these keys.
    stems : list of str
        Stems of the image/mask pairs found.

    Returns
    -------
    split : dict
        ``{"train": [...], "test": [...]}`` sorted (empty lists when it is unusable).
    problems : list of str
        Unreadable file, wrong structure, names that are paths (``../x``, ``/etc/x``),
        unknown stems, stems not assigned, stems in both.
    """
    name = "given split" if isinstance(split, dict) else str(split)
    empty = {"train": [], "test": []}
    if not isinstance(split, dict):
        try:
            split = json.loads(Path(split).read_text())
        except (OSError, ValueError) as exc:
            return empty, [f"{name}: cannot read the split ({type(exc).__name__}: {exc})"]
    if (
        not isinstance(split, dict)
        or set(split) != {"train", "test"}
        or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in split.values()
        )
    ):
        return empty, [
            f'{name}: expected {{"train": [stems], "test": [stems]}} with exactly these two keys'
        ]
    train, test, known = set(split["train"]), set(split["test"]), set(stems)
    if paths := sorted(s for s in train | test if _is_path(s)):
        return empty, [
            f"{name}: {len(paths)} name(s) are paths, not file stems: "
            f"{', '.join(map(repr, paths[:5]))}; a split lists stems of files in the data "
            "folders (e.g. img_001), never paths that could lead outside them"
        ]
    problems = []
    if unknown := sorted((train | test) - known):
        problems.append(
            f"{name}: {len(unknown)} stem(s) with no image/mask pair: {', '.join(unknown)}"
        )
    if both := sorted(train & test):
        problems.append(f"{name}: stem(s) in both train and test: {', '.join(both)}")
    if missing := sorted(known - train - test):
        problems.append(
            f"{name}: {len(missing)} image(s) not in the split: {', '.join(missing)}; "
            "add them to train or test, or move the files away"
        )
    if not train:
        problems.append(f"{name}: the train list is empty")
    return {"train": sorted(train), "test": sorted(test)}, problems


def _is_path(name: str) -> bool:
    """True for a name that is not a plain file stem (separators, ``..``, drive, NUL)."""
    return (
        name in ("", ".", "..")
        or "\x00" in name
        or len(PurePosixPath(name).parts) != 1
        or len(PureWindowsPath(name).parts) != 1
    )
