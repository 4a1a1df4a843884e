"""Put a database folder in place: refuse to clobber, write in a temp folder, swap it in.

:func:`install_folder` is the one way a database folder (``scarce ingest``, ``scarce
ingest-stack``) comes into place: written into a temporary folder beside it, then renamed, so
a crash or ``kill -9`` leaves the old database or none, never half of one, and the next run
removes what a killed one left (:func:`scarce.atomic.sweep_stale`).

References
----------
POSIX ``rename(2)``; Linux ``renameat2(2)`` with ``RENAME_EXCHANGE``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from scarce import atomic
from scarce.errors import OutputExistsError, WriteError


def check_output_folder(out_dir: str | os.PathLike, *, overwrite: bool, replaceable=None) -> None:
    """Refuse an existing ``out_dir`` unless overwriting one that holds only replaceable names.

    First the leftovers of killed writers of ``out_dir`` are swept
    (:func:`scarce.atomic.sweep_stale`): their temporary folders are removed, and a folder a
    killed replacement had moved aside is put back as ``out_dir`` (then checked like any other).

    Parameters
    ----------
    out_dir : path-like
        The folder a writer is about to create.
    overwrite : bool
        Whether an existing folder may be replaced.
    replaceable : set of str, optional
        Names an existing folder may hold for an overwrite; ``None`` accepts any content.

    Raises
    ------
    OutputExistsError
        If ``out_dir`` exists and ``overwrite`` is false, is not a folder, or holds a name
        outside ``replaceable``.
    """
    out_dir = Path(out_dir)
    atomic.sweep_stale(out_dir.parent, {out_dir.name})
    if not out_dir.exists():
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out_dir} exists; pass overwrite=True (--overwrite) to replace "
            "it or choose another output folder"
        )
    if not out_dir.is_dir() or (
        replaceable is not None and set(os.listdir(out_dir)) - set(replaceable)
    ):
        raise OutputExistsError(
            f"refusing to replace {out_dir}: it is not a Scarce database folder "
            f"(it holds files other than {', '.join(sorted(replaceable or ()))})"
        )


@contextlib.contextmanager
def install_folder(
    out_dir: str | os.PathLike, *, overwrite: bool = False, replaceable=None
) -> Iterator[Path]:
    """Write a database folder atomically: yield a temporary folder, then rename it into place.

    The temporary folder ``.NAME.tmp-PID@HOST-TOKEN`` is made beside ``out_dir``, after the
    leftovers of killed writers of the same ``out_dir`` are swept (:func:`check_output_folder`).
    When the ``with`` block ends normally it replaces
    ``out_dir``: swapped in one atomic step where the system can (Linux ``renameat2``), else
    the old folder is renamed aside first. On any exception, ``KeyboardInterrupt`` included, the
    temporary folder is removed and ``out_dir`` is left as it was. So ``out_dir`` is always the
    old folder, the new one, or absent: never half; a ``kill -9`` between the two renames of
    the fallback leaves the old folder aside, and the next run puts it back.

    Parameters
    ----------
    out_dir : path-like
        Final folder, e.g. ``db/nist``.
    overwrite : bool
        Replace an existing ``out_dir``.
    replaceable : set of str, optional
        Names ``out_dir`` may hold for an overwrite (e.g. ``{"train.lmdb", "test.lmdb",
        "split.json"}``); anything else makes it refuse. ``None`` accepts any content.

    Yields
    ------
    pathlib.Path
        The empty temporary folder to write into.

    Raises
    ------
    OutputExistsError
        Before anything is written: ``out_dir`` exists and ``overwrite`` is false, or it holds
        files outside ``replaceable``.
    scarce.errors.WriteError
        If the disk is full or read-only (``out_dir`` is then left as it was).
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite, replaceable=replaceable)
    tmp = atomic.temp_path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _rename_into_place(tmp, out_dir)
    except WriteError as exc:
        raise WriteError(f"{exc}; {out_dir} was left as it was") from exc
    except OSError as exc:
        if exc.errno in atomic.DISK_ERRNOS:
            raise atomic.write_error(tmp, exc) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` ends up at ``tmp`` (or aside)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if atomic.exchange(tmp, out_dir):
        return  # the old folder is now at tmp; the caller removes it
    old = atomic.temp_path(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
