"""DistributedDataParallel plumbing for ``torchrun`` (gloo on CPU, NCCL on CUDA).

``torchrun --standalone --nproc_per_node=K -m scarce train ...`` starts K processes and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` reads them.
Without those variables the run is a single process and nothing here touches
``torch.distributed``. Several nodes use the same command with torchrun's rendezvous flags
(``--nnodes``, ``--rdzv-backend=c10d``, ``--rdzv-endpoint=HOST:PORT``); see the README and
``scripts/slurm_train.sh``.

References
----------
PyTorch DistributedDataParallel and torchrun documentation; the nanoGPT ``train.py`` DDP set-up.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scarce.config import AMP_MODES
from scarce.errors import DeviceError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank, number of processes, rank on this node.
    device : torch.device
        The device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op for a single process) and return it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run ``scarce <argv>`` under ``torchrun --standalone --nproc_per_node=nproc``.

    On a CPU-only machine each process gets one intra-op thread (``OMP_NUM_THREADS=1``).
    On the 2-vCPU development machine 2 processes x 1 thread trained at 0.93-1.05x the speed of
    1 process x 2 threads (``benchmarks/results/train_step.md``); bf16 autocast was the larger
    win there (about 1.9x).

    Returns
    -------
    int
        torchrun's exit code.
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "scarce",
        *argv,
    ]
    return subprocess.call(cmd, env=env)
