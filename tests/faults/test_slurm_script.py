"""``scripts/slurm_train.sh`` under a stand-in SLURM: the pre-emption warning stops the ranks,
the job requeues itself, and the requeued job resumes to the uninterrupted run's weights.

``srun`` runs its command, ``torchrun`` runs ``python -m scarce`` with its own options dropped
(one process on this machine), ``scontrol`` answers ``show hostnames`` and records ``requeue``.
SIGUSR1 is sent to the batch shell, as ``sbatch --signal=B:USR1@90`` does.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from scarce.engine.checkpoint import load_checkpoint
from tests.faults.procs import Run, assert_same_weights, train_args, weights

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm_train.sh"
FAKES = {
    "srun": '#!/usr/bin/env bash\nexec "$@"\n',
    "torchrun": (
        "#!/usr/bin/env bash\n"
        'while [[ "$1" != "-m" ]]; do shift; done\n'
        "shift 2  # -m scarce\n"
        'exec "$SCARCE_PYTHON" -m scarce "$@"\n'
    ),
    "scontrol": (
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == show ]]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi\n'
    ),
}


def test_preemption_warning_requeues_and_the_job_resumes(reference, nist_db, tmp_path, record):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, scontrol = tmp_path / "run", tmp_path / "scontrol.log"
    flags = train_args(nist_db, out)[7:]  # after --train-db, --test-db, --out
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SCARCE_PYTHON": sys.executable,
        "SCONTROL_LOG": str(scontrol),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "1",
    }
    args = [nist_db, out, *flags, "--device", "cpu"]
    job = Run(args, tmp_path / "job1.txt", program=["bash", SCRIPT], **env)
    try:
        job.wait_for("step 6/")
        job.signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends to the batch shell
        assert job.wait(timeout=90) == 0, job.output()[-3000:]
        assert "requeueing job 4242" in job.output()
        assert scontrol.read_text().split() == ["requeue", "4242"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "signal" and summary["signal"] == "SIGTERM"
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == summary["steps"]
        assert job.survivors() == []
    finally:
        job.end()
    again = Run(args, tmp_path / "job2.txt", program=["bash", SCRIPT], **env)  # the requeued job
    try:
        assert again.wait() == 0, again.output()[-3000:]
    finally:
        again.end()
    assert f"Resumed {out} at step {summary['steps']}" in again.output()
    assert scontrol.read_text().split() == ["requeue", "4242"]  # finished: not requeued again
    assert_same_weights(reference.weights, weights(out))
    record("slurm script: pre-emption warning, requeue, resumed exactly")
