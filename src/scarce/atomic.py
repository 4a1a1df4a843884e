"""Atomic outputs: temporary names that say who writes them, rename into place, sweep leftovers.

Every file or folder Scarce writes comes into place the same way: it is written under a
temporary name beside its final name and renamed over it (``os.replace``, atomic on POSIX), so
a crash or a ``kill -9`` leaves the old file or none, never half of one. Checkpoints are also
flushed to the disk (``fsync``) before the rename, so they survive a power cut as well.

The temporary name records its writer: ``.NAME.tmp-PID@HOST-TOKEN[.SUFFIX]`` (the suffix keeps
the format of writers that choose it by extension; ``old`` instead of ``tmp`` marks a folder
moved aside while a new one replaces it). A later run removes such leftovers with
:func:`sweep_stale`, safely: only this pattern, only in the folder it is about to write, and
only when the writer is gone (same host, and process PID no longer running, a zombie, or a newer
process that reuses the number). It logs every path it removes or restores.

:func:`write_error` turns the ``OSError`` of a full disk (``ENOSPC``, ``EDQUOT``), a read-only
or size-limited file system (``EROFS``, ``EFBIG``) or a refused write (``EACCES``, ``EPERM``)
into a one-line :class:`~scarce.errors.WriteError` naming the path, the free space and the space
needed; :func:`reserve_space` claims the blocks of a file before it is written through a memory
map (where a full disk would otherwise end the process with SIGBUS).

References
----------
POSIX ``rename(2)``; Linux ``fallocate(2)`` and ``proc(5)`` (``/proc/PID/stat`` start time);
LMDB's documentation on ``MDB_WRITEMAP`` and full disks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scarce.errors import WriteError

log = logging.getLogger(__name__)

DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system or the size limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TEMP = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$"
)


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temporary name beside ``path`` that names this process and host.

    Parameters
    ----------
    path : path-like
        The final file or folder, e.g. ``run/checkpoints/last.pt``.
    kind : {"tmp", "old"}
        ``tmp`` for what is being written, ``old`` for a folder moved aside.

    Returns
    -------
    pathlib.Path
        ``.NAME.KIND-PID@HOST-TOKEN`` plus ``path``'s suffix, in ``path``'s folder.
    """
    path = Path(path)
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}@{_host()}-{token}{path.suffix}")


@dataclass(frozen=True)
class TempName:
    """What a Scarce temporary name says: the final name, kind, and the writer's pid and host."""

    name: str
    kind: str
    pid: int
    host: str


def parse_temp(name: str) -> TempName | None:
    """Parse a name made by :func:`temp_path`; ``None`` for any other name."""
    match = _TEMP.match(name)
    if match is None:
        return None
    return TempName(match["name"], match["kind"], int(match["pid"]), match["host"])


def _not_the_writer(pid: int, since: float) -> bool:
    """True if process ``pid`` is a zombie or started after ``since`` (epoch seconds), per /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5)
    return fields[0] == "Z" or started > since + 1.0


def writer_gone(temp: TempName, mtime: float) -> bool:
    """True when the process that wrote a temporary file is certainly not running.

    Only a writer on this host can be checked; one elsewhere (a shared file system) counts as
    running. This process is never "gone".

    Parameters
    ----------
    temp : TempName
        From :func:`parse_temp`.
    mtime : float
        Modification time of the temporary path, epoch seconds (a live process with the same
        pid that started later is not its writer).
    """
    if temp.host != _host() or temp.pid == os.getpid():
        return False
    try:
        os.kill(temp.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return _not_the_writer(temp.pid, mtime)


def sweep_stale(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the leftovers of killed writers in ``folder``; restore a folder moved aside.

    Only names made by :func:`temp_path` whose writer is gone (:func:`writer_gone`) are
    touched, and with ``names`` only the temporaries of those final names. A ``.NAME.old-...``
    folder whose ``NAME`` is missing (a replacement killed between its two renames) is renamed
    back to ``NAME``; any other leftover is deleted. Each action is logged (INFO).

    Parameters
    ----------
    folder : path-like
        Where the outputs go (nothing happens if it does not exist).
    names : iterable of str, optional
        Final names whose leftovers may go (e.g. ``{"last.pt", "best.pt"}``); default: all.

    Returns
    -------
    list of pathlib.Path
        The paths removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    done = []
    for path in sorted(folder.iterdir()):
        temp = parse_temp(path.name)
        if temp is None or (wanted is not None and temp.name not in wanted):
            continue
        try:
            if not writer_gone(temp, path.lstat().st_mtime):
                log.info(
                    "left %s: its writer (pid %d on %s) may still run", path, temp.pid, temp.host
                )
                continue
        except FileNotFoundError:
            continue
        final = folder / temp.name
        if temp.kind == "old" and not final.exists():
            os.rename(path, final)
            log.warning("restored %s from %s (a replacement was killed half-way)", final, path.name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by process %d (no longer running)", path, temp.pid)
        else:
            path.unlink(missing_ok=True)
            log.info("removed %s, left by process %d (no longer running)", path, temp.pid)
        done.append(path)
    return done


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def write_error(path: str | os.PathLike, exc: OSError, needed: int | None = None) -> WriteError:
    """A one-line :class:`WriteError` for an ``OSError`` raised while writing ``path``.

    Parameters
    ----------
    path : path-like
        What was being written.
    exc : OSError
        The error; its ``errno`` picks the wording.
    needed : int, optional
        Bytes the write needs (said in the message with the free space), bytes.

    Returns
    -------
    WriteError
        To raise ``from exc``.
    """
    path = Path(path)
    reason = DISK_ERRNOS.get(exc.errno, exc.strerror or str(exc))
    where = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free in {where}"
    except OSError:
        free = f"free space in {where} unknown"
    need = f", about {_size(needed)} needed" if needed else ""
    fix = {
        errno.EROFS: "choose an output folder on a writable disk",
        errno.EACCES: "choose an output folder you may write to",
        errno.EPERM: "choose an output folder you may write to",
    }.get(exc.errno, "free some space or choose another output folder")
    return WriteError(f"cannot write {path}: {reason} ({free}{need}); {fix}")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, needed: int | None = None, durable: bool = False
) -> Iterator[Path]:
    """Write ``path`` through a temporary file: yield its name, then rename it into place.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed and
    ``path`` is left as it was; an ``OSError`` of a full or read-only disk becomes a
    :class:`WriteError` (see :func:`write_error`).

    Parameters
    ----------
    path : path-like
        The final file.
    needed : int, optional
        Bytes the write needs, for the error message.
    durable : bool
        ``fsync`` the file before the rename and the folder after it (survives a power cut).

    Yields
    ------
    pathlib.Path
        The temporary file to write (same folder and suffix as ``path``).

    Raises
    ------
    WriteError
        If the disk is full, read-only, size-limited, or refuses the write.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS and not isinstance(exc, WriteError):
            raise write_error(path, exc, needed) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`); returns ``path``."""
    with atomic_output(path, needed=len(data), durable=durable) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_output`); returns ``path``."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns
    -------
    bool
        True when swapped; False where the system or file system cannot (then nothing moved).

    Raises
    ------
    OSError
        For any other failure (e.g. a missing path).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
    libc.renameat2.argtypes += (ctypes.c_uint,)
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fallocate(fd: int, nbytes: int) -> int:
    """``fallocate(fd, 0, 0, nbytes)``; returns 0 or the ``errno``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return 0 if libc.fallocate(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()


def reserve_space(path: str | os.PathLike, nbytes: int) -> bool:
    """Allocate the first ``nbytes`` of file ``path`` on the disk now (Linux ``fallocate(2)``).

    A file written through a shared memory map (LMDB with ``MDB_WRITEMAP``) has no way to
    report a full disk: the process dies of SIGBUS. Reserving the blocks first turns that into
    an ``ENOSPC`` here, before anything is written.

    Parameters
    ----------
    path : path-like
        An existing file (it grows to ``nbytes`` if smaller).
    nbytes : int
        Bytes to reserve.

    Returns
    -------
    bool
        True when reserved; False where the system or file system cannot (not Linux, or
        ``EOPNOTSUPP``): the caller should then avoid writing through a memory map.

    Raises
    ------
    WriteError
        If the disk has not enough space (or quota, or the file size limit is lower).
    """
    if not sys.platform.startswith("linux"):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        err = _fallocate(fd, int(nbytes))
    finally:
        os.close(fd)
    if err == 0:
        return True
    if err in DISK_ERRNOS:
        raise write_error(path, OSError(err, os.strerror(err)), needed=int(nbytes))
    return False


__all__ = [
    "DISK_ERRNOS",
    "TempName",
    "atomic_output",
    "exchange",
    "parse_temp",
    "reserve_space",
    "sweep_stale",
    "temp_path",
    "write_bytes",
    "write_error",
    "write_text",
    "writer_gone",
]
