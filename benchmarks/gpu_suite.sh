#!/usr/bin/env bash
# The GPU checks and measurements, in one go, for a lent multi-GPU machine
# (see docs/benchmarks.md). Logs go to ${OUT:-/tmp/gpu}. SKIP_TRANSFER=1 skips
# the transfer bandwidth benchmark.
#   bash benchmarks/gpu_suite.sh
# On 4 H200s the whole suite runs longer than one 10-minute device call;
# its blocks are independent, so run them in separate calls.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/cards.txt"
echo "== NCCL tests: transfer engine and runtime ($gpus GPUs)"
timeout 600 python3 -m pytest -q -m gpu -p no:cacheprovider tests/adapters/test_transfer_nccl.py \
  tests/adapters/test_pull_nccl.py tests/runtime/test_nccl_runtime.py \
  tests/runtime/test_forward_concurrency.py 2>&1 | tee "$out/nccl_tests.txt" | tail -5
echo "== stream_waits: which work waits for a busy kernel on another stream"
timeout 60 python3 benchmarks/diagnostics/stream_waits.py 2>&1 | tee "$out/stream_waits.txt"
for n in 2 4; do
  [ "$gpus" -ge "$n" ] || continue
  if [ "${SKIP_TRANSFER:-0}" != 1 ]; then
    echo "== transfer_bench on $n GPUs"
    timeout 300 python3 benchmarks/transfer_bench.py --gpus "$n" 2>&1 | grep -v Warning \
      | tee "$out/transfer_bench_$n.txt" | tail -12
  fi
  echo "== pull_bench on $n GPUs"
  timeout 200 python3 benchmarks/pull_bench.py --gpus "$n" --layers 1 4 2>&1 | grep -v Warning \
    | tee "$out/pull_bench_$n.txt" | tail -12
  echo "== gpu_path on $n GPUs"
  timeout 900 python3 benchmarks/gpu_path.py --gpus "$n" 2>&1 | grep -v Warning \
    | tee "$out/gpu_path_$n.txt" | tail -40
done
echo "== gpu_path on $gpus GPUs with transfer_path=auto (same-node pulls)"
timeout 540 python3 benchmarks/gpu_path.py --gpus "$gpus" --transfer-path auto 2>&1 \
  | grep -v Warning | tee "$out/gpu_path_pull_$gpus.txt" | tail -12
echo "== simulate under torchrun, NCCL, $gpus GPUs, exact arithmetic (invariance check)"
timeout 240 torchrun --nproc-per-node "$gpus" -m eplb_fsm simulate --steps 120 --tokens 256 \
  --step-interval 40 --window-size 20 --shift-at 60 --check-every 20 \
  2>&1 | tee "$out/simulate_nccl.txt" | grep -E "invariance|balancedness|rebalances done"
