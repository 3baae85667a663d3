#!/usr/bin/env bash
# One call on the lent GPU machine (see ../shared/device/README.md), everything under $OUT:
# 1. tests/test_gpu.py: ΔG on GPU vs CPU, bf16 training, a training step in CUDA's sync-debug mode
#    (no host-device synchronisation inside a step), step capture (CUDA graphs) training alike, 4 actors
#    sharing one GPU;
# 2. issue 12's targets: `geoprune bench --job` of the full-width ResNet-18 on 20,000 Fashion-MNIST
#    images (10 + 5 epochs): the Ray wall (adaptive arm only) against the same spec in one process
#    (distribution overhead; one pair, to fit the device time), all four arms against adaptive only, GPU busy,
#    where it ran (the probe actors' GPU ids, the fine-tune's device), the stage time line.
#    With "quick" as the argument it runs `geoprune bench --device cuda` instead of 2: among its figures the
#    project's loop against the plain loop at batch 256 and 512 and step capture against the plain loop
#    (issue 12's ≥ 0.95 and ≥ 1.3 targets; `training_resnet18` in bench.json).
#    With "speed" as the argument it runs issue 15's check instead of 2: the full-width ResNet-18 (32×32) pruned
#    at ratio 0.25 in every group (about 1.78× fewer MACs), unrounded and rounded to 8 and 16, timed as the
#    cuda-bf16 target times (bf16 and fp16 with channels_last, fp32; batches 1, 256 and 4096 or 1024; CUDA events;
#    target: ≥ 1.25× at the large batch in bf16, rounded to 16).
#    With "evidence" as the argument it runs issue 16's GPU seed instead of 2: seed-0 of
#    jobs/evidence_fashion_gpu.yaml (every arm and every allocation at 2×, 3× and 4× fewer MACs; 16 fine-tunes) and
#    its evidence JSON under $OUT/evidence, to commit into bench/results/evidence_fashion_gpu.
# 1 and 2 cover what the former bench/gpu_core.py and bench/gpu_pipeline.py measured (issue 14): ΔG on CUDA
# against the CPU, the core on CUDA (`bench --job`'s one-process side, adaptive_prune) and the Ray pipeline's
# GPU placement and stage times (its Ray side).
#
# Prepare here:  bash ../shared/device/make-wheels.sh                      (writes .whl/, git-ignored)
#                python -m geoprune_ray.bench.fashion_subset 20000 .data/fashion-20k   (13 MB, git-ignored)
# Then one device call, carry [".whl", ".data/fashion-20k"], timeout_s ~420:
#   bash bench/device_check.sh
# Status (issues 12, 15, 16): not yet run on a GPU (no session of them was lent one).
set -uo pipefail
: "${OUT:?OUT must be set (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bash ../shared/device/make-wheels.sh first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
if [ "${1:-}" = speed ]; then
  timeout 300 python3 -m geoprune_ray.bench.rounding --sweep resnet18 --deploy cuda-bf16 --ratio 0.25 \
    --multiples 1,8,16 --output "$OUT/rounding" 2>&1 | tee "$OUT/rounding.log" | tail -40
elif [ "${1:-}" = evidence ]; then
  [ -d .data/fashion-20k ] || { echo "no .data/fashion-20k: run python -m geoprune_ray.bench.fashion_subset and carry it"; exit 1; }
  timeout 540 python3 -m geoprune_ray.app.cli batch jobs/evidence_fashion_gpu.yaml --storage /tmp/evidence --only seed-0 \
    2>&1 | tee "$OUT/evidence.log" | grep -v "probes: " | tail -40
  python3 -m geoprune_ray.app.cli evidence /tmp/evidence --output "$OUT/evidence" 2>&1 | tail -60
elif [ "${1:-}" = quick ]; then
  timeout 230 python3 -m geoprune_ray.app.cli bench --output "$OUT/bench" --device cuda 2>&1 | tee "$OUT/bench.log" | tail -40
else
  [ -d .data/fashion-20k ] || { echo "no .data/fashion-20k: run python -m geoprune_ray.bench.fashion_subset and carry it"; exit 1; }
  timeout 420 python3 -m geoprune_ray.app.cli bench --job jobs/gpu_fashion_resnet18_20k.yaml --pairs 1 --output "$OUT/job" 2>&1 \
    | tee "$OUT/job.log" | grep -v "probes: " | tail -60
fi
echo "exit ${PIPESTATUS[0]}"
