#!/usr/bin/env bash
# One call on the lent GPU machine (see ../shared/device/README.md): the GPU tests
# (tests/test_gpu.py: ΔG on GPU vs CPU, bf16 training, 4 actors sharing one GPU), then the GPU
# benchmark of `geoprune bench` (training vs a plain loop, data path, probe parts with the actor's
# GPU memory, 4 probe actors on one GPU, a Ray Train launch, a reduced pipeline with its search
# overhead and memory), everything under $OUT.
#
# Prepare here:  bash ../shared/device/make-wheels.sh          (writes .whl/, git-ignored)
# Then one device call, carry [".whl"], timeout_s ~300:
#   bash bench/device_check.sh
# Synthetic data and digits only: Ray's wheels and Fashion-MNIST do not fit in one 64 MiB call.
# Status (issue 5): not yet run on a GPU (no session so far was lent one).
set -uo pipefail
: "${OUT:?OUT must be set (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bash ../shared/device/make-wheels.sh first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
timeout 230 python3 -m geoprune_ray.app.cli bench --output "$OUT/bench" --device cuda 2>&1 | tee "$OUT/bench.log" | tail -40
echo "exit ${PIPESTATUS[0]}"
