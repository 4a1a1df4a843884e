"""DDP fault plumbing: naming a dead rank, ending a rank stuck behind it, one all-reduce of flags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import torch

from scarce.engine import distributed
from scarce.engine.distributed import DistInfo, PeerWatch
from scarce.errors import PeerLostError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_collective_names_the_dead_rank():
    host, gone = socket.gethostname(), dead_pid()
    info = DistInfo(0, 3, 0, torch.device("cpu"), ((host, os.getpid()), (host, gone), (host, 1)))
    watch = PeerWatch(info)
    assert watch.dead() == [1]
    error = watch.error(RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer"))
    assert isinstance(error, PeerLostError) and error.exit_code == 3
    message = str(error)
    assert f"rank 1 (pid {gone})" in message and "--resume" in message and "\n" not in message
    assert watch.error(ValueError("a bug")) is None  # not a lost peer: the bug keeps its traceback


def test_a_lost_peer_on_another_host_is_still_reported():
    info = DistInfo(0, 2, 0, torch.device("cpu"), (("here", os.getpid()), ("elsewhere", 12345)))
    error = PeerWatch(info).error(RuntimeError("Gloo connection closed by peer"))
    assert "another rank (on another host, or hung)" in str(error)
    single = DistInfo(0, 1, 0, torch.device("cpu"))
    assert PeerWatch(single).error(RuntimeError("gloo")) is None


STUCK = textwrap.dedent(
    """
    import socket, sys, time, torch
    sys.path.insert(0, sys.argv[1])
    from scarce.engine.distributed import DistInfo, PeerWatch
    peers = ((socket.gethostname(), 0), (socket.gethostname(), int(sys.argv[2])))
    info = DistInfo(0, 2, 0, torch.device("cpu"), peers)
    with PeerWatch(info, grace_s=0.5, interval_s=0.1):
        time.sleep(30)  # a collective that never returns
    """
)


def test_a_rank_stuck_behind_a_dead_one_exits_within_the_grace_period():
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", STUCK, src, str(dead_pid())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == PeerLostError.exit_code, done.stderr
    assert time.monotonic() - start < 20
    assert "rank 1" in done.stderr and "died" in done.stderr


def test_any_rank_passes_flags_through_for_one_process():
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    assert distributed.any_rank(True, False, info=info) == (True, False)
