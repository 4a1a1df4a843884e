#!/usr/bin/env bash
# GPU check of issue 14, prepared for a lent GPU machine (H100/H200); under 8 minutes.
#
# Measures training images/s at 256 x 256 (planned and default model; bf16, channels_last,
# torch.compile), the plan's predicted vs measured step time and memory, the readers' rate and
# the workers needed to feed the GPU, sliding-window megapixels/s and alignment pairs/s.
# Writes benchmarks/results/gpu.md and gpu.json (see benchmarks/gpu_check.py).
#
# On the device machine (bare, no network; python3 there holds torch, opencv, scikit-image,
# tifffile, tensorboard, psutil, but not lmdb): prepare once on a machine with pip, in the
# repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl lmdb
#   mkdir -p shared-data && cp -r ../shared/data/nist_rpe shared-data/   # optional: real data
# then run with carry [".whl", "shared-data"] (or without data: synthetic disks are made):
#   DATA=shared-data bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 python3 benchmarks/gpu_check.py
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$OUT"/; fi
