"""How Scarce's processes start and end: graceful stops on signals, no orphans, exit codes.

- :class:`GracefulStop` turns SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-emption warning,
  ``sbatch --signal=USR1@90``) into a request the trainer reads between two steps: it finishes
  the step, saves ``last.pt`` and exits with :data:`EXIT_STOPPED`; ``--resume`` continues. Only
  the first signal counts: the copies a process group and a launcher forward are ignored; a
  SIGINT more than :data:`REPEAT_S` seconds later (Ctrl-C pressed again) aborts at once.
- :func:`die_with_parent` makes a child process end when the process it serves ends, even by
  ``kill -9``: Linux ``prctl(PR_SET_PDEATHSIG)`` for a direct parent, else a thread that waits
  on a pidfd of that process (or polls it once a second where there are no pidfds).

Exit codes of the ``scarce`` command: 0 done, 1 a bug (traceback), 2 a problem with the input
or settings (:class:`~scarce.errors.ScarceError`), 3 another process of a DDP run died
(:class:`~scarce.errors.PeerLostError`), :data:`EXIT_STOPPED` = 75 stopped by a signal after
saving ``last.pt`` (``EX_TEMPFAIL`` of BSD's ``sysexits.h``: try again, i.e. ``--resume``),
130 interrupted without saving.

References
----------
nnU-Net v2 (a run stopped with Ctrl-C continues with ``--c``); PyTorch Lightning's
fault-tolerant training (requeue on SIGUSR1); SLURM ``sbatch --signal`` and ``--requeue``;
Linux ``prctl(2)`` ``PR_SET_PDEATHSIG`` and ``pidfd_open(2)``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # stopped by a signal, last.pt saved: resume with --resume
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C twice, KeyboardInterrupt) without saving
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_S = 2.0  # a second SIGINT later than this after the first aborts at once


class GracefulStop:
    """Context manager: while active, SIGTERM, SIGINT and SIGUSR1 only request a stop.

    Handlers can only be installed from the main thread; elsewhere the context does nothing
    and :attr:`requested` stays false. The previous handlers come back on exit.

    Attributes
    ----------
    signum : int or None
        The first signal received, else ``None``.

    Examples
    --------
    >>> with GracefulStop() as stop:                     # doctest: +SKIP
    ...     while not stop.requested:
    ...         step()
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.signum = tuple(signals), None
        self._first, self._saved = 0.0, {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """Name of the signal received (``"SIGTERM"``), else ``None``."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first > REPEAT_S:
            raise KeyboardInterrupt

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}


def _prctl_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` on Linux; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc
        return False


def _watch(pid: int, sig: int) -> None:
    """Thread body: wait until process ``pid`` ends, then send ``sig`` to this process."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()  # readable once the process has ended
    else:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> str:
    """Make this process receive ``sig`` when ``parent`` ends (any way, ``kill -9`` included).

    Parameters
    ----------
    sig : int
        The signal to receive: ``SIGKILL`` for helpers that hold nothing worth saving (reader
        workers), ``SIGTERM`` for processes that save their state first (DDP ranks).
    parent : int, optional
        The process to outlive by nothing; default the direct parent. If it has already ended,
        ``sig`` is sent at once.

    Returns
    -------
    str
        How: ``"prctl"`` (the kernel's parent-death signal, direct parent on Linux) or
        ``"watch"`` (a daemon thread waiting on a pidfd, or polling every second).
    """
    direct = parent is None or parent == os.getppid()
    parent = os.getppid() if parent is None else parent
    how = "prctl" if direct and _prctl_pdeathsig(sig) else "watch"
    if how == "watch":
        threading.Thread(
            target=_watch, args=(parent, sig), daemon=True, name="scarce-parent-watch"
        ).start()
    elif os.getppid() != parent:  # the parent ended before prctl took effect
        os.kill(os.getpid(), sig)
    return how


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_STOPPED",
    "GracefulStop",
    "REPEAT_S",
    "STOP_SIGNALS",
    "die_with_parent",
]
