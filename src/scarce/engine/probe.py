"""Measuring this machine: timed steps, peak memory and the facts a run plan needs.

:class:`PeakMemory` reads the high-water mark of the memory a run uses: on CUDA the bytes the
caching allocator handed out (``torch.cuda.max_memory_allocated``), on the CPU the process's
peak resident set size (Linux ``VmHWM``, which writing ``5`` to ``/proc/self/clear_refs``
resets; elsewhere the current RSS from psutil, a lower bound); before a reset the C heap's free
pages go back to the OS (glibc ``malloc_trim``), so a peak measures what a call needs.
:func:`time_calls` times a callable (one training step, one forward pass) after warm-up calls
and returns the median. :func:`machine_facts` lists cores, free memory and bf16 support.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from scarce.engine.distributed import cpu_has_native_bf16

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def current_rss() -> int:
    """Resident set size of this process now, bytes (psutil)."""
    return int(psutil.Process().memory_info().rss)


def _vm_hwm() -> int | None:
    """Linux peak RSS of this process (``VmHWM`` in ``/proc/self/status``), bytes."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc
        pass


class PeakMemory:
    """The high-water mark of the memory this process uses on ``device``, resettable.

    Parameters
    ----------
    device : torch.device
        ``cuda`` devices read the CUDA caching allocator; anything else the process RSS.

    References
    ----------
    ``torch.cuda.max_memory_allocated``; Linux ``proc(5)``: ``/proc/pid/clear_refs`` (value 5
    resets the peak RSS, since Linux 4.0) and ``VmHWM`` in ``/proc/pid/status``.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._floor = 0

    def reset(self) -> None:
        """Start a new interval: the peak becomes the present use."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._floor = int(torch.cuda.memory_allocated(self.device))
            return
        gc.collect()
        _trim_heap()  # give freed memory back, so the peak starts from what is in use
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or not allowed: the peak cannot be reset
            pass
        self._floor = current_rss()

    def increase(self) -> int:
        """How far the peak rose above the use at the last :meth:`reset`, bytes."""
        return max(0, self.peak() - self._floor)

    def peak(self) -> int:
        """The peak since the last :meth:`reset`, bytes (see the class docstring)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_hwm()
        return max(hwm if hwm is not None else current_rss(), self._floor)


def time_calls(call: Callable[[], object], *, warmup: int, repeats: int, device) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls after ``warmup`` calls, seconds.

    CUDA work is synchronised before and after each call, so the time covers the kernels.

    Raises
    ------
    ValueError
        If ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def usable_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity`` where available)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_facts(device: torch.device) -> dict:
    """What the plan needs to know about the machine before it measures anything.

    Returns
    -------
    dict
        ``device`` (str), ``name`` (GPU or CPU model), ``cores`` (usable CPU cores),
        ``threads`` (torch intra-op threads), ``memory_bytes`` (free GPU memory, or the
        available system memory plus this process's RSS), ``bf16`` (the device computes bf16
        natively: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX), ``load_1min`` (the 1-minute
        load average, or None).
    """
    device = torch.device(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    facts = {"device": str(device), "cores": usable_cores(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        facts.update(
            name=torch.cuda.get_device_name(device),
            memory_bytes=int(free),
            bf16=bool(torch.cuda.is_bf16_supported()),
        )
    else:
        facts.update(
            name=_cpu_name(),
            memory_bytes=int(psutil.virtual_memory().available) + current_rss(),
            bf16=cpu_has_native_bf16(),
        )
    facts["load_1min"] = None if load is None else round(load, 2)
    return facts


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


__all__ = ["PeakMemory", "current_rss", "machine_facts", "time_calls", "usable_cores"]
