"""DistributedDataParallel plumbing for ``torchrun`` (gloo on CPU, NCCL on CUDA).

``torchrun --standalone --nproc_per_node=K -m scarce train ...`` starts K processes and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` reads them.
Without those variables the run is a single process and nothing here touches
``torch.distributed``. Several nodes use the same command with torchrun's rendezvous flags
(``--nnodes``, ``--rdzv-backend=c10d``, ``--rdzv-endpoint=HOST:PORT``); see the README and
``scripts/slurm_train.sh``.

Faults: every rank ends when its launcher ends (:func:`scarce.lifecycle.die_with_parent` with
SIGTERM, so it still saves ``last.pt``); a rank that dies makes the others exit within a bounded
time naming it (:class:`PeerWatch`: the next collective fails at once on gloo, and a rank stuck
in one is ended after ``grace_s``); ``scarce train --nproc K`` runs torchrun in a session of its
own and forwards SIGTERM, SIGINT and SIGUSR1 to it once (:func:`launch_torchrun`).

References
----------
PyTorch DistributedDataParallel and torchrun documentation; the nanoGPT ``train.py`` DDP set-up.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scarce.config import AMP_MODES
from scarce.errors import DeviceError, PeerLostError
from scarce.lifecycle import die_with_parent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank, number of processes, rank on this node.
    device : torch.device
        The device this process trains on.
    peers : tuple of (str, int)
        ``(host, pid)`` of every rank, by rank (gathered once by :func:`setup`; empty for a
        single process).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    peers: tuple = ()

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """Turn a device name into a :class:`torch.device`; the one place Scarce does this.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "cuda:N"} or torch.device or None
        ``"auto"`` (or ``None``) picks ``cuda`` when available, else ``cpu``.
    local_rank : int
        Under ``torchrun``, plain ``cuda`` (and ``auto`` on a GPU machine) means
        ``cuda:LOCAL_RANK``.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        For an unknown name, or when CUDA is asked for but not available (or the index is
        out of range); the message says what to use instead.
    """
    if name is None or str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(name)!r} asked for, but CUDA is not available here "
                "(CPU-only torch or no GPU); use --device cpu or auto"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are "
                "visible"
            )
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {str(name)!r}; use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_native_bf16() -> bool:
    """True when this x86 CPU has bf16 instructions (AVX512-BF16 or AMX), per PyTorch.

    Without them, bf16 autocast on the CPU emulates bf16 arithmetic and is slower than
    float32, so ``amp: auto`` keeps float32 there. Uses ``torch.cpu._is_avx512_bf16_supported``
    and ``torch.cpu._is_amx_tile_supported`` (present since torch 2.1; private, so a torch
    without them counts as "no"). ARM CPUs with bf16 (e.g. Graviton 3) also report False.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    except RuntimeError:  # pragma: no cover - a torch build without cpuinfo
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """Turn the config's ``amp`` (``auto`` | ``off`` | ``bf16`` | ``fp16``) into a concrete mode.

    ``auto`` picks what pays on ``device``: on CUDA, ``bf16`` where the GPU supports it
    (Ampere and newer), else ``fp16`` with a gradient scaler (nnU-Net trains with fp16 autocast
    by default); on a CPU, ``bf16`` when :func:`cpu_has_native_bf16` (measured 1.9x samples/s
    for the default U-Net on an AVX512-BF16 EPYC, benchmarks/results/train_step.md) else
    ``off``; on any other device ``off``. Other values pass through unchanged.

    Raises
    ------
    DeviceError
        For ``fp16`` on a device that is not CUDA.
    ValueError
        For an unknown mode.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}; got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError("amp fp16 needs a CUDA device; use --amp bf16 (or auto) on the CPU")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "off"


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the process group when launched by ``torchrun``; else a single process.

    The backend is NCCL for CUDA devices and gloo for the CPU.

    Each rank of a distributed run gets SIGTERM when its launcher (torchrun's agent) ends, so
    no rank outlives a killed launcher, and records ``(host, pid)`` of all ranks for
    :class:`PeerWatch`.

    Parameters
    ----------
    device : str
        ``auto`` | ``cpu`` | ``cuda``; under torchrun each process takes ``cuda:LOCAL_RANK``.
    timeout_minutes : float
        Collective timeout (a rank that evaluates alone must not be killed too early), minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    peers = ()
    if world_size > 1:
        die_with_parent(signal.SIGTERM)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (socket.gethostname(), os.getpid()))
        peers = tuple(tuple(p) for p in gathered)
    return DistInfo(rank, world_size, local_rank, dev, peers)


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op for a single process) and return it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(*flags: bool, info: DistInfo) -> tuple[bool, ...]:
    """For each flag, true if it is true on any rank (every rank gets the same answers).

    One all-reduce carries all flags (e.g. "time is up" and "a stop signal arrived"), so all
    ranks take the same decision at the same step.
    """
    if not info.distributed:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its launcher) is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


class PeerWatch:
    """While active, watch the other ranks on this host; name one that dies; end a stuck rank.

    A thread checks every ``interval_s`` whether the other ranks' processes on this host still
    run. When one has died it logs which, and if this rank has not ended ``grace_s`` later
    (stuck in a collective that will never complete) it exits with
    :attr:`PeerLostError.exit_code`. :meth:`error` turns the exception of a failed
    collective into a :class:`PeerLostError` naming the dead rank. Does nothing for a single
    process.

    Parameters
    ----------
    info : DistInfo
        This rank, with ``peers`` from :func:`setup`.
    grace_s, interval_s : float
        Seconds to wait for a stuck rank to end by itself; seconds between checks.
    """

    def __init__(self, info: DistInfo, grace_s: float = 30.0, interval_s: float = 1.0):
        self.info, self.grace_s, self.interval_s = info, grace_s, interval_s
        self._done = threading.Event()

    def dead(self) -> list[int]:
        """Ranks on this host whose process has ended."""
        host = socket.gethostname()
        return [
            r
            for r, (h, pid) in enumerate(self.info.peers)
            if r != self.info.rank and h == host and not _alive(pid)
        ]

    def _describe(self, ranks: list[int]) -> str:
        return ", ".join(f"rank {r} (pid {self.info.peers[r][1]})" for r in ranks)

    def error(self, exc: BaseException) -> PeerLostError | None:
        """A :class:`PeerLostError` for ``exc`` if it came from losing another rank, else None."""
        if not self.info.distributed or not isinstance(exc, RuntimeError | dist.DistError):
            return None
        dead = self.dead()
        if not dead and "gloo" not in str(exc).lower() and not isinstance(exc, dist.DistError):
            return None
        who = self._describe(dead) if dead else "another rank (on another host, or hung)"
        return PeerLostError(
            f"rank {self.info.rank}: {who} of this run died, so this rank stops too "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "continue from the last checkpoint with --resume"
        )

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            dead = self.dead()
            if not dead:
                continue
            log.error("rank %d: %s died; stopping this rank", self.info.rank, self._describe(dead))
            if not self._done.wait(self.grace_s):
                log.error(
                    "rank %d: still stuck %.0f s later; exiting", self.info.rank, self.grace_s
                )
                logging.shutdown()
                os._exit(PeerLostError.exit_code)
            return

    def __enter__(self) -> PeerWatch:
        if self.info.distributed and self.info.peers:
            self._done.clear()
            threading.Thread(target=self._run, daemon=True, name="scarce-peer-watch").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def run_torchrun() -> None:
    """torchrun's ``main`` in a process that ends with its parent (see :func:`launch_torchrun`).

    torchrun's agent forwards SIGTERM and SIGINT to its ranks and gives them 30 s to end; a
    SIGTERM when the ``scarce`` process that started it dies (even by ``kill -9``) lets the
    ranks save ``last.pt`` instead of being orphaned.
    """
    from torch.distributed.run import main

    die_with_parent(signal.SIGTERM)
    main(sys.argv[1:])


def launch_torchrun(nproc: int, argv: list[str]) -> tuple[int, str | None]:
    """Re-run ``scarce <argv>`` under ``torchrun --standalone --nproc_per_node=nproc``.

    On a CPU-only machine each process gets one intra-op thread (``OMP_NUM_THREADS=1``).
    On the 2-vCPU development machine 2 processes x 1 thread trained at 0.93-1.05x the speed of
    1 process x 2 threads (``benchmarks/results/train_step.md``); bf16 autocast was the larger
    win there (about 1.9x).

    torchrun runs in a session of its own, so a Ctrl-C or a signal to this process group
    reaches it once, through this process: SIGTERM, SIGINT and SIGUSR1 are forwarded (SIGUSR1
    as SIGTERM, which torchrun's agent passes on to the ranks), and the ranks stop gracefully.
    torchrun ends when this process ends (:func:`run_torchrun`).

    Returns
    -------
    code : int
        torchrun's exit code.
    forwarded : str or None
        The name of the first signal forwarded (``"SIGTERM"``), else ``None``.
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-c",
        "from scarce.engine.distributed import run_torchrun; run_torchrun()",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "scarce",
        *argv,
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    forwarded: list[str] = []

    def forward(signum, frame) -> None:
        if not forwarded:
            forwarded.append(signal.Signals(signum).name)
            proc.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    saved = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = proc.wait()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return code, (forwarded[0] if forwarded else None)
