#!/usr/bin/env bash
# The GPU measurements issue 3 owes, in stages that each fit one device call (10 minutes):
#   bash bench/gpu_session.sh tests      GPU parity tests + kernel tests on CUDA
#   bash bench/gpu_session.sh bench      fastgrok bench: every variant but torch.compile, N 128/512/2048, B 1..max
#   bash bench/gpu_session.sh compiled   the torch.compile baseline alone (its compiles take minutes)
#   bash bench/gpu_session.sh precision  validation grid in every precision (default-precision choice)
#   bash bench/gpu_session.sh e2e        the 1,156-model wd diagram end to end, and 8192 models of N 512
#   bash bench/gpu_session.sh dropout    the 1,156-model dropout diagram
#   bash bench/gpu_session.sh sweep      tile sizes and the two dU/dV scatters of the Triton step (N 512, B 1024, tf32)
# e2e and dropout also make issue 4's paper-scale phase diagrams (phase, ipr); their PNGs, tables and logs
# come back as $OUT/<stage>.tar.gz (no weights). The IPR and pruning figures need no GPU (README gallery).
# With 30 minutes of device time a session, take them in this order: tests + sweep, bench, precision + e2e,
# dropout, compiled; put two stages in one call where both fit in 10 minutes (a fresh machine costs minutes).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "${1:-}" in
  tests) python3 -m pytest -q tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) fastgrok bench --width 128,512,2048 --models 1,64,1024,max --variants torch,torch-tf32,triton-fp32,triton-tf32,triton-tf32-onehot,triton-tf32x3,triton-bf16 \
           --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
  compiled) fastgrok bench --width 128,512,2048 --models 1024 --variants torch-compile --out "$OUT/bench-compiled.json" 2>&1 | tee "$OUT/bench-compiled.log" ;;
  precision) python3 bench/validate_precision.py --out "$OUT/precision.json" 2>&1 | tee "$OUT/precision.log" ;;
  e2e|dropout)
    preset=wd-diagram
    [ "$1" = dropout ] && preset=dropout-diagram
    { time fastgrok train --preset $preset --log-every 100 --precision "${PRECISION:-tf32}" --out /tmp/$1
      fastgrok phase /tmp/$1 --x xi --y alpha && fastgrok ipr /tmp/$1; } 2>&1 | tee "$OUT/$1.log"
    tar -czf "$OUT/$1.tar.gz" -C /tmp/$1 --exclude='*.safetensors' .
    [ "$1" = e2e ] && python3 - <<'PY' 2>&1 | tee -a "$OUT/e2e.log"
import torch
from fastgrok.backends import TritonBackend
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population
pop = Population([Hyper(width=512, seed=i) for i in range(8192)], Settings(), "cuda")
TritonBackend("tf32").step(pop)
torch.cuda.synchronize()
print(f"8192 models of N 512: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
PY
    ;;
  sweep) python3 bench/sweep_blocks.py --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
  *) echo "usage: $0 tests|sweep|bench|compiled|precision|e2e|dropout"; exit 2 ;;
esac
