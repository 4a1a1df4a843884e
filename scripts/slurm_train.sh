#!/usr/bin/env bash
# Multi-node data-parallel training with SLURM + torchrun (one task per node, one process per
# GPU) that survives its time limit and pre-emption. Submit with:
#     sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [extra scarce train flags]
# 90 s before the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@90). The script
# sends SIGTERM to srun, which forwards it to torchrun on every node, which passes it to every
# rank: each rank finishes its step, all stop at the same step, rank 0 saves last.pt, and they
# exit with 75. The script then requeues the job (--requeue); the requeued job finds last.pt and
# continues with --resume, exactly where it stopped. A job that ends by itself (exit 0) or fails
# is not requeued, nor is one cancelled with scancel (SIGTERM to everything: the ranks still
# save last.pt, resume by hand with the same command).
#SBATCH --job-name=scarce-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
DB=${1:?usage: sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [flags]}
RUN=${2:?usage: sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [flags]}
shift 2
resume=()
if [[ -f "$RUN/checkpoints/last.pt" ]]; then
  resume=(--resume) # a requeued (or resubmitted) job continues the run
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=4

warned=0
on_warning() {
  warned=1
  echo "$(date '+%F %T') SIGUSR1 (time limit or pre-emption ahead): stopping the ranks" >&2
  kill -TERM "${training:-}" 2>/dev/null || true
}
trap on_warning USR1

# Every node runs one torchrun; they meet at the head node (c10d rendezvous). The batch size
# is per process: the global batch is nodes x GPUs x --batch-size.
srun torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="${SLURM_GPUS_ON_NODE:-4}" \
  --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$head_node:29500" \
  -m scarce train --train-db "$DB/train.lmdb" --test-db "$DB/test.lmdb" --out "$RUN" \
  --device cuda "${resume[@]}" "$@" &
training=$!

# `wait` returns as soon as the trap runs: wait again until the ranks have saved and exited
set +e
wait "$training"
code=$?
while kill -0 "$training" 2>/dev/null; do
  wait "$training"
  code=$?
done
set -e

if ((warned)); then
  echo "$(date '+%F %T') training stopped (exit $code); requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$code"
