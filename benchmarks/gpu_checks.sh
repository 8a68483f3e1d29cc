#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, in one call of the device tool (logs and result
# JSONs under $OUT/gpu_results.tar.gz). Each step has its own time limit so one slow step cannot
# take the others' output with it. bench_compile reports the reuse step's share of a compute step,
# the cache bytes and a copy's bandwidth (the memory-traffic ideal beside the FLOP ideal).
#   bash benchmarks/gpu_checks.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT/logs"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n 12 "$OUT/logs/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
step test_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
# Latte-1 size, fp16: compiled Static(2) measured / FLOP ideal (target >= 0.97), and the same loops with
# CUDA graphs (mode reduce-overhead) timed beside them in the same process (target: not slower).
step compile_full_fp16 300 python3 benchmarks/bench_compile.py --device cuda --size full --fp16 --steps 10 --loops 3 --also-mode reduce-overhead
step kernels_full_fp16 90 python3 benchmarks/bench_kernels.py --device cuda --size full --fp16
# Host time of a skipping call at real depth against diffusers' hook, device work included (last: the
# least needed; ~40 s on this workplace's CPU).
step skip_host_cuda 90 python3 benchmarks/peer_skip_host.py --device cuda --calls 60
# The same with a rank-16 LoRA on every model: adacache_fx then also fingerprints the adapter tensors
# (one fused norm and one host wait per call; see runtime/adapter_weights.py).
step skip_host_cuda_lora 60 python3 benchmarks/peer_skip_host.py --device cuda --calls 60 --models flux --lora 16
cp benchmarks/results/*cuda* "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_results.tar.gz" -C "$OUT" logs
ls "$OUT"
