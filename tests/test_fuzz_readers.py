"""Fuzzing the image readers: mutated real files and random headers end in a result or a
ScarceError, within a time bound, without crashing the interpreter or exhausting memory.

Seeds are real files of ../shared/data (a nist_rpe 16-bit TIFF, dsb2018 8-bit gray and RGB
PNGs, a bbbc039 16-bit PNG, and JPEG/BMP re-encodings of a dsb2018 image). Hypothesis mutates
their bytes (overwrites, truncations, insertions, aimed at the headers most of the time) and
builds headers from scratch with random sizes, bit depths, colour types and sample counts.
Each example runs :func:`scarce.io.read_image` and :func:`scarce.io.read_mask` with the pixel
limit set to 2**20 (so a decoder that ignored it would be caught by the memory bound) under a
hard time limit. The number of examples per test is ``$SCARCE_FUZZ_EXAMPLES`` (default 40;
``make faults`` runs 500); with ``$SCARCE_FUZZ_REPORT`` set, the examples run and their outcomes
are written there as JSON (docs/reliability.md quotes them).
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import io as bytes_io
import json
import os
import resource
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scarce import headers, io
from scarce.errors import ScarceError
from tests import hostile
from tests.shared import SHARED_DATA

EXAMPLES = int(os.environ.get("SCARCE_FUZZ_EXAMPLES", "40"))
SECONDS_PER_EXAMPLE = 20.0  # a decoder stuck longer than this is a hang
MEMORY_GROWTH_MB = 1500  # peak RSS may grow by at most this over a whole fuzz run
OUTCOMES: collections.Counter = collections.Counter()  # per reader call
EXAMPLES_RUN: collections.Counter = collections.Counter()  # per generated file
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timing on a shared CPU varies; the hard limit below catches hangs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
    derandomize=True,  # the same examples on every run (seeded), so numbers are reproducible
)


def _seed_files() -> dict[str, bytes]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    dsb = SHARED_DATA / "dsb2018" / "images"
    gray = dsb / "13c8ff1f49886e91c98ce795c93648ad8634c782ff57eb928ce29496b0425057.png"
    seeds = {
        "nist.tif": sorted((SHARED_DATA / "nist_rpe" / "images").iterdir())[0].read_bytes(),
        "gray.png": gray.read_bytes(),
        "rgb.png": (
            dsb / "af576e8ec3a8d0b57eb6a311299e9e4fd2047970d3dd9d6f52e54ea6a91109da.png"
        ).read_bytes(),
        "16bit.png": sorted((SHARED_DATA / "bbbc039" / "images").iterdir())[0].read_bytes(),
    }
    for fmt, ext in (("JPEG", ".jpg"), ("BMP", ".bmp")):
        buffer = bytes_io.BytesIO()
        Image.open(gray).save(buffer, format=fmt)
        seeds[f"gray{ext}"] = buffer.getvalue()
    return seeds


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return _seed_files()


@pytest.fixture(scope="module", autouse=True)
def bounded():
    """Pixel limit 2**20 while fuzzing; afterwards check the memory bound, write the report."""
    headers.set_max_pixels(1 << 20)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    faulthandler.dump_traceback_later(30 * 60, exit=True)  # last resort for a C-level hang
    yield
    faulthandler.cancel_dump_traceback_later()
    headers.set_max_pixels(None)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - start
    report = os.environ.get("SCARCE_FUZZ_REPORT")
    if report:
        summary = {
            "examples": sum(EXAMPLES_RUN.values()),
            "by_kind": dict(EXAMPLES_RUN),
            "reader_calls": sum(OUTCOMES.values()),
            "peak_rss_growth_mb": grown,
        }
        Path(report).write_text(json.dumps({**summary, "outcomes": dict(OUTCOMES)}, indent=1))
    assert grown < MEMORY_GROWTH_MB, f"peak memory grew by {grown} MB while fuzzing"


class Hang(Exception):
    """A reader ran past the time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(signum, frame):
        raise Hang(f"a reader ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_both(path: Path, label: str) -> None:
    """Read ``path`` as an image and as a mask: a result or a ScarceError, nothing else."""
    EXAMPLES_RUN[label.split(" ")[0]] += 1
    for reader in (io.read_image, io.read_mask):
        with time_limit(SECONDS_PER_EXAMPLE):
            try:
                array = reader(path)
            except ScarceError:
                OUTCOMES[f"{label}: refused"] += 1
                continue
        assert isinstance(array, np.ndarray) and array.size <= 16 << 20
        OUTCOMES[f"{label}: read"] += 1


@st.composite
def mutated(draw, seeds: dict[str, bytes]):
    """A seed file with a few bytes overwritten, a chunk inserted or deleted, or cut short."""
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    rng = draw(st.randoms(use_true_random=False))  # uniform positions (integers() favours 0)
    for _ in range(draw(st.integers(1, 8))):
        near_header = draw(st.booleans())  # the first 512 bytes hold most headers
        at = rng.randrange(max(min(len(data), 512) if near_header else len(data), 1))
        kind = draw(st.sampled_from(["overwrite"] * 6 + ["insert", "delete", "truncate"]))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if kind == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = chunk
        elif kind == "delete":
            del data[at : at + len(chunk)]
        else:
            del data[at:]
    return name, bytes(data)


def test_mutated_real_files(seeds, tmp_path):
    @FUZZ
    @given(mutated(seeds))
    def run(case):
        name, data = case
        read_both(hostile.write(tmp_path / name, data), "mutated " + name.split(".")[-1])

    run()


def _png(width: int, height: int, depth: int, colour: int, body: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(body)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(body and zlib.compress(body)))
        + idat
        + struct.pack(">I", zlib.crc32(idat))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


SIZES = st.one_of(st.integers(0, 70_000), st.integers(0, 2**31 - 1))


@FUZZ
@given(
    width=SIZES,
    height=SIZES,
    depth=st.sampled_from([1, 2, 4, 8, 16, 3, 32]),
    colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
    body=st.binary(max_size=256),
)
def test_random_png_headers(tmp_path_factory, width, height, depth, colour, body):
    path = hostile.write(
        tmp_path_factory.mktemp("png") / "x.png", _png(width, height, depth, colour, body)
    )
    read_both(path, "random PNG header")


@FUZZ
@given(
    width=SIZES,
    height=SIZES,
    samples=st.integers(0, 65_535),
    bits=st.sampled_from([1, 8, 12, 16, 32, 64, 0, 7]),
)
def test_random_tiff_headers(tmp_path_factory, width, height, samples, bits):
    data = hostile.tiff_claiming(width, height, samples=samples, bits=bits)
    read_both(hostile.write(tmp_path_factory.mktemp("tif") / "x.tif", data), "random TIFF header")


@FUZZ
@given(width=st.integers(0, 65_535), height=st.integers(0, 65_535), bmp=st.booleans())
def test_random_jpeg_and_bmp_headers(tmp_path_factory, width, height, bmp):
    folder = tmp_path_factory.mktemp("hdr")
    if bmp:
        path = hostile.write(folder / "x.bmp", hostile.bmp_claiming(width, -height))
    else:
        path = hostile.write(folder / "x.jpg", hostile.jpeg_claiming(width, height))
    read_both(path, "random BMP header" if bmp else "random JPEG header")
