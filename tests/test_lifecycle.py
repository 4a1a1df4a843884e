"""Graceful stops on signals and children that end with their parent (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from scarce import lifecycle
from scarce.lifecycle import GracefulStop

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_a_stop_signal_is_a_request_and_repeats_are_ignored():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding the same stop: ignored
        os.kill(os.getpid(), signal.SIGINT)  # at once after the first: ignored too
        assert stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored


def test_ctrl_c_pressed_again_later_aborts(monkeypatch):
    monkeypatch.setattr(lifecycle, "REPEAT_S", 0.0)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT"
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs between two bytecodes


def test_outside_the_main_thread_it_does_nothing():
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(GracefulStop().__enter__()._saved))
    thread.start()
    thread.join()
    assert seen == [{}]


# CHILD: makes itself end with ``parent`` (argv[1], or its direct parent), prints how, sleeps.
CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from scarce.lifecycle import die_with_parent
    parent = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(die_with_parent(parent=parent), flush=True)
    time.sleep(120)
    """
)
# PARENT: starts CHILD directly ("prctl"), or through a middle process that then waits, as the
# fork server stands between a trainer and its reader workers ("watch"); prints the pids.
PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child, src, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "prctl":
        proc = subprocess.Popen([sys.executable, "-c", child, src], stdout=subprocess.PIPE, text=True)
        print(proc.pid, proc.stdout.readline().strip(), "none", flush=True)
    else:
        middle = (
            "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
            "sys.argv[2], sys.argv[3]], stdout=subprocess.PIPE, text=True); "
            "print(p.pid, p.stdout.readline().strip(), flush=True); import time; time.sleep(120)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", middle, child, src, str(os.getpid())],
            stdout=subprocess.PIPE, text=True,
        )
        print(proc.stdout.readline().strip(), proc.pid, flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")
@pytest.mark.parametrize("how", ["prctl", "watch"])
def test_a_child_ends_when_the_process_it_serves_is_killed(how):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, SRC, how], stdout=subprocess.PIPE, text=True
    )
    pid, used, middle = parent.stdout.readline().split()
    try:
        assert used == how and _alive(int(pid))
        parent.kill()  # SIGKILL: nothing runs in the killed process
        parent.wait()
        assert _wait_gone(int(pid), 5.0), f"child {pid} outlived the process it serves ({how})"
    finally:
        for leftover in (pid, middle):
            if leftover != "none" and _alive(int(leftover)):
                os.kill(int(leftover), signal.SIGKILL)
