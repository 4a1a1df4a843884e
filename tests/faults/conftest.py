"""The fault suite: every test here is marked ``faults`` (run with ``make faults``).

With ``$SCARCE_FAULTS_REPORT`` set, the counts the tests record (kills survived, stops resumed,
pages damaged, ...) are written there as JSON at the end of the session; docs/reliability.md
quotes them.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest

from tests.faults.procs import Reference, Run, train_args, weights

COUNTS: collections.Counter = collections.Counter()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def record():
    """``record(name, n=1)``: add ``n`` to a named count of the session's report."""

    def add(name: str, n: int = 1) -> None:
        COUNTS[name] += n

    yield add
    report = os.environ.get("SCARCE_FAULTS_REPORT")
    if report:
        old = json.loads(Path(report).read_text()) if Path(report).is_file() else {}
        for key, value in COUNTS.items():
            old[key] = old.get(key, 0) + value
        Path(report).write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")


@pytest.fixture(scope="session")
def reference(nist_db, tmp_path_factory) -> Reference:
    """The uninterrupted tiny training run every killed or stopped run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = Run(train_args(nist_db, out), out.parent / "log.txt")
    run.wait_for("Training unet")
    start = time.monotonic()
    assert run.wait() == 0, run.output()
    return Reference(weights(out), time.monotonic() - start)
