"""napari reader for Scarce's outputs: ``<stem>.ome.zarr`` prediction groups and TIFFs.

An OME-Zarr group written by ``scarce predict`` opens as its image (probabilities or class
map, hidden) and one labels layer per ``labels/<name>`` (class map, instances), lazily and
with the pixel size as the layer scale; ``<stem>_instances.tif`` opens as a labels layer and
``<stem>_prob.tif`` as one image layer per class, with the pixel size in their TIFF metadata.
"""

from __future__ import annotations

from pathlib import Path


def _tiff_scale(path: Path) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel from ImageJ resolution tags, if recorded."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        if "XResolution" not in tags or not (tif.imagej_metadata or {}).get("unit") == "um":
            return None
        numerator, denominator = tags["XResolution"].value
        return (denominator / numerator,) * 2 if numerator else None


def _read_tiff(path: Path) -> list[tuple]:
    import tifffile

    data = tifffile.imread(path)
    scale = _tiff_scale(path)
    meta = {"name": path.stem, **({"scale": scale} if scale else {})}
    if path.stem.endswith("_prob"):
        return [(data, {**meta, "channel_axis": 0}, "image")]
    return [(data, meta, "labels")]


def _read_zarr(path: Path) -> list[tuple]:
    from scarce.data.omezarr import open_image, open_labels

    lazy = open_image(path)
    scale = {"scale": (lazy.pixel_size_um,) * 2} if lazy.pixel_size_um else {}
    image = lazy.array
    layers = [(image, {"name": path.name, "visible": False, "channel_axis": 0, **scale}, "image")]
    for group in sorted((path / "labels").iterdir()):
        if group.is_dir():
            layers.append((open_labels(path, group.name), {"name": group.name, **scale}, "labels"))
    return layers


def read(path) -> list[tuple]:
    """Layer-data tuples of one Scarce output (see the module docstring)."""
    path = Path(path)
    return _read_zarr(path) if path.is_dir() else _read_tiff(path)


def get_reader(path):
    """npe2 reader hook: :func:`read` for Scarce outputs, ``None`` for anything else."""
    if isinstance(path, list):
        return None
    path = Path(path)
    if path.is_dir() and path.name.endswith(".zarr"):
        return read if (path / "labels" / "class_map").is_dir() else None
    if path.name.endswith(("_instances.tif", "_prob.tif")):
        return read
    return None


__all__ = ["get_reader", "read"]
