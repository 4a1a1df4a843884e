"""Atomic outputs: temp names that name their writer, safe sweeping, disk errors in one line."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest

from scarce import atomic
from scarce.errors import WriteError
from tests import hostile


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(folder, final: str, pid: int, kind: str = "tmp", host: str | None = None):
    """A temporary name of ``final`` as process ``pid`` would have made it."""
    name = atomic.temp_path(folder / final, kind).name
    parsed = atomic.parse_temp(name)
    name = name.replace(f"-{os.getpid()}@{parsed.host}-", f"-{pid}@{host or parsed.host}-")
    return folder / name


def test_temp_names_record_the_writer_and_keep_the_suffix(tmp_path):
    tmp = atomic.temp_path(tmp_path / "img_01.png")
    assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".img_01.png.")
    parsed = atomic.parse_temp(tmp.name)
    assert parsed.name == "img_01.png" and parsed.kind == "tmp" and parsed.pid == os.getpid()
    assert atomic.parse_temp(".img_01.png.tmp") is None  # an older, ownerless pattern
    assert atomic.parse_temp("img_01.png") is None
    host = atomic.parse_temp(atomic.temp_path(tmp_path / "db", "old").name)
    assert host.kind == "old" and host.name == "db"


def test_sweep_removes_only_dead_writers_leftovers_and_says_so(tmp_path, caplog):
    gone = dead_pid()
    stale = leftover(tmp_path, "last.pt", gone)
    stale.write_bytes(b"half")
    stale_dir = leftover(tmp_path, "db", gone)
    (stale_dir / "train.lmdb").mkdir(parents=True)
    live = leftover(tmp_path, "best.pt", os.getppid())  # a running process: may still write
    live.write_bytes(b"writing")
    elsewhere = leftover(tmp_path, "last.pt", gone, host="another-node")
    elsewhere.write_bytes(b"?")
    mine = atomic.temp_path(tmp_path / "last.pt")  # this process: never swept
    mine.write_bytes(b"mine")
    foreign = tmp_path / ".last.pt.tmp"  # not Scarce's pattern
    foreign.write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"good")
    with caplog.at_level(logging.INFO, logger="scarce"):
        removed = atomic.sweep_stale(tmp_path)
    assert sorted(removed) == sorted([stale, stale_dir])
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists() and elsewhere.exists() and mine.exists() and foreign.exists()
    assert (tmp_path / "last.pt").read_bytes() == b"good"
    assert f"left by process {gone} (no longer running)" in caplog.text
    assert "may still run" in caplog.text


def test_sweep_restores_a_folder_a_killed_replacement_moved_aside(tmp_path, caplog):
    gone = dead_pid()
    aside = leftover(tmp_path, "db", gone, kind="old")
    (aside / "train.lmdb").mkdir(parents=True)
    new = leftover(tmp_path, "db", gone)  # the complete new folder, never renamed in
    new.mkdir()
    with caplog.at_level(logging.INFO, logger="scarce"):
        atomic.sweep_stale(tmp_path, {"db"})
    assert (tmp_path / "db" / "train.lmdb").is_dir() and not aside.exists() and not new.exists()
    assert "restored" in caplog.text


def test_sweep_only_touches_the_names_asked_for(tmp_path):
    gone = dead_pid()
    other = leftover(tmp_path, "other-db", gone)
    other.mkdir()
    assert atomic.sweep_stale(tmp_path, {"db"}) == [] and other.exists()


def test_a_newer_process_with_the_same_pid_is_not_the_writer(tmp_path):
    parent = os.getppid()  # started long before a temp file written now
    stale = leftover(tmp_path, "x.tif", parent)
    stale.write_bytes(b"x")
    os.utime(stale, (1.0, 1.0))  # written in 1970: pytest's parent cannot have written it
    assert atomic.writer_gone(atomic.parse_temp(stale.name), stale.stat().st_mtime)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EFBIG, "file too large"),
    ],
)
def test_disk_errors_become_one_line_and_keep_the_old_file(tmp_path, monkeypatch, code, words):
    target = tmp_path / "summary.json"
    target.write_text("old")
    monkeypatch.setattr(atomic, "open", hostile.failing_open(code), raising=False)
    with pytest.raises(WriteError) as caught:
        atomic.write_text(target, "new" * 1000)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and words in message
    assert "free in" in message and "2.9 KiB needed" in message
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp left


def test_a_half_written_file_never_reaches_its_final_name(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    monkeypatch.setattr(atomic, "open", hostile.failing_open(), raising=False)
    with pytest.raises(WriteError, match="no space left"):
        atomic.write_bytes(target, b"x" * 4096, durable=True)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_reserve_space_reports_the_space_needed(tmp_path, monkeypatch):
    data = tmp_path / "data.mdb"
    data.write_bytes(b"")
    assert atomic.reserve_space(data, 1 << 20) is True  # a real fallocate on this disk
    assert data.stat().st_size == 1 << 20
    monkeypatch.setattr(atomic, "_fallocate", lambda fd, n: errno.ENOSPC)
    with pytest.raises(WriteError, match=r"no space left on device .*, about 3\.0 GiB needed"):
        atomic.reserve_space(data, 3 << 30)
    monkeypatch.setattr(atomic, "_fallocate", lambda fd, n: errno.EOPNOTSUPP)
    assert atomic.reserve_space(data, 1 << 20) is False  # the caller avoids the memory map


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
