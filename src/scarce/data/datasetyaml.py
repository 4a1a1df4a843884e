"""``dataset.yaml``: what a dataset's owner says about it, read and checked for ingest.

Optional, beside the images (or ``--metadata``). Every key is optional; unknown keys and
values of the wrong type are problems (reported with all the others of an ingest)::

    class_names: [background, cell]     # one name per class id
    channel_names: [phase]
    pixel_size_um: 0.65                 # micrometres per pixel
    description: HES colonies, phase contrast, 10x
    mask_kind: class                    # or instance
    ignore_label: 255                   # mask value of unlabelled pixels
    authors: [Jane Doe, John Roe]       # who made the data (bioimage.io export)
    license: CC-BY-4.0                  # SPDX identifier (bioimage.io export)
    cite:                               # how to cite the data (bioimage.io export)
      - {text: "Doe J. et al. 2024", doi: 10.1234/abcd}

The values travel into the database metadata and the checkpoint (``extras["dataset"]``), so
outputs carry the pixel size and a bioimage.io package its authors, licence and citation.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _citations(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("text"), str) and set(c) <= {"text", "doi", "url"}
        for c in value
    )


_DATASET_RULES = {  # dataset.yaml key: (accepts the value, what it must be)
    "class_names": (_strings, "a list of strings"),
    "channel_names": (_strings, "a list of strings"),
    "pixel_size_um": (
        lambda v: type(v) in (int, float) and v > 0,
        "a positive number (micrometres per pixel)",
    ),
    "description": (lambda v: isinstance(v, str), "a string"),
    "mask_kind": (lambda v: v in ("class", "instance"), "'class' or 'instance'"),
    "ignore_label": (lambda v: type(v) is int and v >= 0, "a non-negative integer"),
    "authors": (_strings, "a list of names"),
    "license": (lambda v: isinstance(v, str), "an SPDX licence identifier such as CC-BY-4.0"),
    "cite": (_citations, "a list of {text, doi or url} mappings"),
}
DATASET_KEYS = tuple(_DATASET_RULES)


def read_dataset_metadata(path) -> tuple[dict, list[str]]:
    """Read an optional ``dataset.yaml`` (class/channel names, pixel size, authors, ...).

    Parameters
    ----------
    path : path-like or None
        The YAML file; ``None`` gives the defaults.

    Returns
    -------
    meta : dict
        All of ``DATASET_KEYS``, ``None`` where not given or not valid.
    problems : list of str
        Unreadable file, unknown keys, wrong types; each names the file.
    """
    meta = dict.fromkeys(DATASET_KEYS)
    if path is None:
        return meta, []
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())  # one line; python/* tags are refused here
        return meta, [f"{path}: cannot read dataset metadata ({type(exc).__name__}: {problem})"]
    if not isinstance(loaded, dict):
        return meta, [f"{path}: expected a mapping of {', '.join(DATASET_KEYS)}"]
    problems = [
        f"{path}: unknown key {k!r}; allowed: {', '.join(DATASET_KEYS)}"
        for k in loaded
        if k not in DATASET_KEYS
    ]
    for key, (accepts, wanted) in _DATASET_RULES.items():
        value = loaded.get(key)
        if value is not None and accepts(value):
            meta[key] = value
        elif value is not None:
            problems.append(f"{path}: {key} must be {wanted}, got {value!r}")
    return meta, problems


__all__ = ["DATASET_KEYS", "read_dataset_metadata"]
