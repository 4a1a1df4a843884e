"""Reader worker processes: fork server, DataLoader wiring, watchdog, the batch stream.

:func:`scarce.segment.readers.make_train_loader` builds a batch maker (an object with
``batch(b) -> dict of tensors``, ``cfg``, ``db_path`` and ``close()``) and hands it to
:class:`TrainBatches`, which runs it in ``reader_count`` worker processes of a torch
``DataLoader`` over an ``IterableDataset`` (or in the calling process when 0). Worker ``w``
of ``W`` builds batches ``start + w, start + w + W, ...``; the DataLoader returns them in
round-robin order, so the consumer receives ``start, start + 1, ...`` whatever ``W``.

Workers are forked from a clean fork server that has imported :mod:`scarce.segment.readers` but
started no thread (see :func:`worker_context`), and run one thread each. A worker that dies
raises :class:`ReaderError` in the consumer within about 5 s (the DataLoader's liveness
check); a worker that hangs is killed by a watchdog thread after ``timeout_s`` without a
batch (default :data:`WORKER_TIMEOUT_S`) and raises the same way. A worker ends when the
process it reads for ends, however that ends (``kill -9`` included): its parent is the fork
server, which would otherwise keep it, and it the fork server, alive for ever
(:func:`scarce.lifecycle.die_with_parent` on the consumer's pid).
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import signal
import threading
import time
import weakref
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scarce.errors import ReaderError, ScarceError
from scarce.lifecycle import STOP_SIGNALS, die_with_parent

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 120.0  # no batch for this long = hung workers: kill them, raise


class BatchMaker(Protocol):
    """What :class:`TrainBatches` runs: ``batch`` in its workers, ``collate`` in the consumer.

    Implemented by the tasks' readers (``scarce.segment.readers``, ``scarce.align.readers``).
    """

    cfg: object  # the run's config; its ``seed`` seeds the DataLoader's own generator
    db_path: os.PathLike

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch ``b`` (built in a worker; tensors cross processes in shared memory)."""

    def collate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Final touches in the consuming process (e.g. widen a uint8 target to int64)."""

    def close(self) -> None:
        """Release what the maker opened in this process."""


class _BatchStream(IterableDataset):
    """Worker ``w`` of ``W`` yields batches ``start + w, start + w + W, ...``.

    The DataLoader asks its workers in round robin and returns their results in order, so
    the consumer receives ``start, start + 1, ...`` whatever the number of workers.
    """

    def __init__(self, maker: BatchMaker, start: int):
        self.maker, self.start = maker, start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for b in itertools.count(self.start + worker, workers):
            yield self.maker.batch(b)


def batch_generator(seed: int, rank: int, batch: int) -> np.random.Generator:
    """The generator that draws everything random in one training batch.

    Parameters
    ----------
    seed : int
        ``TrainConfig.seed``.
    rank : int
        DDP rank of the consuming process (0 without DDP).
    batch : int
        Index of the batch in the stream (= optimiser step), counted from 0.

    Returns
    -------
    numpy.random.Generator
        PCG64 generator seeded with ``SeedSequence(seed, spawn_key=(rank, batch))``.

    References
    ----------
    NumPy ``SeedSequence.spawn``: child ``i`` of ``SeedSequence(s)`` is
    ``SeedSequence(s, spawn_key=(i,))``; here the key ``(rank, batch)`` names one child per
    rank and batch, independent streams without a shared counter (NumPy NEP 19).
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(rank, batch)))


def resolve_reader_count(n: int) -> int:
    """The number of reader worker processes that ``data.reader_count = n`` asks for.

    Parameters
    ----------
    n : int
        Workers per device: ``>= 1`` as given, ``0`` = read in the training process, ``-1`` =
        auto: half the CPU cores this process may run on, at least 1 and at most 8.

    Returns
    -------
    int
        ``n`` when ``n >= 0``; else ``max(1, min(8, cores // 2))`` with ``cores`` from
        ``os.sched_getaffinity(0)`` (respects taskset and container CPU sets) where the
        platform has it, else ``os.cpu_count()`` (2 if unknown).

    Raises
    ------
    ValueError
        If ``n`` is not an integer or is below -1.

    References
    ----------
    PyTorch's ``DataLoader`` counts usable cores the same way (``os.sched_getaffinity``) when
    it warns about too many workers; the other half of the cores is left to the trainer.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < -1:
        raise ValueError(
            f"data.reader_count must be an integer >= -1 (-1 = auto, 0 = in the "
            f"trainer, k = k worker processes), got {n!r}"
        )
    if n >= 0:
        return int(n)
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 2
    return max(1, min(8, cores // 2))


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (a worker's batch output).

    A batch made in a reader worker crosses to the trainer through shared memory; allocating
    it there from the start saves a copy.

    Parameters
    ----------
    shape : tuple of int
    dtype : torch.dtype
    shared : bool
        Allocate in shared memory (true inside a worker: ``get_worker_info() is not None``).
    """
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if shared else tensor


def init_worker(worker_id: int, consumer: int | None = None) -> None:
    """Set up a fresh worker process: one thread, deaf to stop signals, ends with its consumer.

    SIGTERM, SIGINT and SIGUSR1 are ignored: they reach the workers with the rest of their
    process group (Ctrl-C, ``scancel``, torchrun stopping a rank), and the consumer must keep
    its batches while it finishes its step and saves; the workers end when it closes the
    stream, or when it ends.

    Parameters
    ----------
    worker_id : int
        DataLoader worker index (unused: every worker is set up alike).
    consumer : int, optional
        Pid of the process the worker reads for (the trainer); the worker kills itself when
        that process ends (:func:`scarce.lifecycle.die_with_parent`).
    """
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    if consumer is not None:
        die_with_parent(signal.SIGKILL, parent=consumer)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import cv2  # safe here: the fork server never started OpenCV's thread pool

    cv2.setNumThreads(1)


def worker_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """Fork workers from a clean server process that has imported Scarce but run nothing.

    Plain ``fork`` copies the parent's thread pools (OpenCV, OpenMP) in whatever state they
    are in: a worker forked after the parent used ``cv2`` with threads hung in
    ``cv2.setNumThreads`` (pthread_cond_destroy). ``spawn`` is safe but re-imports torch in
    every worker (seconds each). The fork server imports the ``preload`` modules (the module
    of the batch maker, e.g. :mod:`scarce.segment.readers`, and with it torch) once, without
    starting any thread, and forks the workers from it (milliseconds each, after the first).

    Parameters
    ----------
    preload : tuple of str
        Module names the fork server imports before forking (used when it first starts).

    Returns
    -------
    multiprocessing.context.BaseContext
        The ``forkserver`` context (``spawn`` where the platform has no fork server).

    References
    ----------
    Python ``multiprocessing`` docs, "Contexts and start methods" (forkserver, preload).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *preload])
    return context


def _one_line(exc: ScarceError) -> ScarceError:
    """A worker's ScarceError as the worker raised it: the DataLoader re-raises it with
    "Caught ... in DataLoader worker process N" and the worker's traceback in the message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.splitlines() if line.strip()][-1]
    try:
        return type(exc)(last.partition(": ")[2] or text)
    except TypeError:  # a class whose constructor takes more than a message
        return exc


def _watchdog(batches: weakref.ref, stop: threading.Event) -> None:
    """Turn a hang into a crash: kill the workers after ``timeout_s`` without a batch.

    Holds only a weak reference, so a forgotten stream is still collected (and its workers
    shut down by the DataLoader iterator's finaliser).
    """
    while not stop.wait(1.0):
        self = batches()
        if self is None:
            return
        since = self._waiting_since
        if since is not None and time.perf_counter() - since > self.timeout_s:
            log.error(
                "no batch from the reader workers in %.0f s: killing them (hung)", self.timeout_s
            )
            for pid in self.worker_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._waiting_since = None
        del self


class TrainBatches:
    """Infinite stream of training batches, built by worker processes.

    Iterating yields the maker's dicts after its ``collate`` (segmentation: ``{"image":
    (N, C, P, P) float32, "target": (N, P, P) int64}``; alignment: source/target patches). Iterating
    again continues the same stream. ``next_batch`` is the stream index of the batch the
    next call returns. Use as a context manager, or call :meth:`close`, to shut the workers
    down. Made by :func:`scarce.segment.readers.make_train_loader`.

    Parameters
    ----------
    maker : BatchMaker
        Builds batch ``b``; pickled to the workers (it must not hold open handles).
    start_batch : int
        Stream index of the first batch, >= 0.
    reader_count : int
        Worker processes; 0 builds batches in the calling process.
    prefetch : int
        Batches each worker prepares ahead (at least 1).
    timeout_s : float, optional
        Seconds without a batch after which the workers count as hung and are killed;
        default :data:`WORKER_TIMEOUT_S` (read when the stream is made).

    Raises
    ------
    ReaderError
        From ``next()``: a worker died, was killed or hung, or the stream was closed.

    References
    ----------
    PyTorch ``torch.utils.data.DataLoader`` with an ``IterableDataset`` (worker sharding
    via ``get_worker_info``, persistent workers, liveness check).
    """

    def __init__(
        self,
        maker: BatchMaker,
        start_batch: int,
        reader_count: int,
        prefetch: int,
        *,
        timeout_s: float | None = None,
    ):
        self.maker, self.reader_count, self.next_batch = maker, reader_count, start_batch
        self.timeout_s = WORKER_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self._waiting_since, self._stop = None, threading.Event()
        if reader_count == 0:
            self._iterator = iter(_BatchStream(maker, start_batch))
            return
        loader = DataLoader(  # timeout=0: the loader checks every 5 s that its workers live
            _BatchStream(maker, start_batch),
            batch_size=None,
            num_workers=reader_count,
            prefetch_factor=max(1, prefetch),
            persistent_workers=True,
            timeout=0,
            worker_init_fn=functools.partial(init_worker, consumer=os.getpid()),
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=worker_context((type(maker).__module__,)),
            generator=torch.Generator().manual_seed(maker.cfg.seed),  # leave global RNG alone
        )
        self._iterator = iter(loader)
        threading.Thread(
            target=_watchdog,
            args=(weakref.ref(self), self._stop),
            daemon=True,
            name="scarce-reader-watchdog",
        ).start()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the reader workers (empty when reading in-process)."""
        return [w.pid for w in getattr(self._iterator, "_workers", [])]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            raise ReaderError("this TrainBatches was closed; make a new one to read again")
        self._waiting_since = time.perf_counter()
        try:
            batch = next(self._iterator)
            batch = self.maker.collate(batch)
        except ScarceError as exc:  # a worker's own ScarceError, with its traceback appended
            raise _one_line(exc) from exc
        except RuntimeError as exc:
            if isinstance(exc, ReaderError) or "DataLoader" not in str(exc):
                raise
            raise self._worker_error(str(exc)) from exc
        except (ConnectionError, EOFError) as exc:
            # a worker killed while handing over a batch's shared memory breaks the fd
            # transfer before the DataLoader notices the death; report it the same way
            # the dying worker's socket closes before its exit is reapable: wait up to 2 s
            workers = getattr(self._iterator, "_workers", [])
            ended = set(mp_connection.wait([w.sentinel for w in workers], timeout=2.0))
            dead = [w.pid for w in workers if w.sentinel in ended] or "unknown"
            raise self._worker_error(
                f"reader worker (pid(s) {dead}) exited unexpectedly while sending a batch: {exc!r}"
            ) from exc
        finally:
            self._waiting_since = None
        self.next_batch += 1
        return batch

    def _worker_error(self, detail: str) -> ReaderError:
        return ReaderError(
            f"reader worker failed while reading {self.maker.db_path} ({detail}); a killed "
            "worker often means the machine ran out of memory (lower data.reader_count, "
            "data.prefetch_batches or data.batch_size); a hung one is killed after "
            f"{self.timeout_s:.0f} s without a batch"
        )

    def close(self) -> None:
        """Shut the worker processes down (idempotent)."""
        self._stop.set()
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.maker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "BatchMaker",
    "TrainBatches",
    "WORKER_TIMEOUT_S",
    "batch_generator",
    "empty_tensor",
    "init_worker",
    "resolve_reader_count",
    "worker_context",
]
