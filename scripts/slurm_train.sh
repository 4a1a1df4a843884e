#!/usr/bin/env bash
# Multi-node data-parallel training with SLURM + torchrun (one task per node, one process
# per GPU). Submit with:  sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [extra scarce train flags]
#SBATCH --job-name=scarce-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
DB=${1:?usage: sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [flags]}
RUN=${2:?usage: sbatch scripts/slurm_train.sh DB_DIR RUN_DIR [flags]}
shift 2
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=4
# Every node runs one torchrun; they meet at the head node (c10d rendezvous). The batch size
# is per process: the global batch is nodes x GPUs x --batch-size.
srun torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="${SLURM_GPUS_ON_NODE:-4}" \
  --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$head_node:29500" \
  -m scarce train --train-db "$DB/train.lmdb" --test-db "$DB/test.lmdb" --out "$RUN" \
  --device cuda "$@"
