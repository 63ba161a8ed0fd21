#!/usr/bin/env bash
# `course-bench nf4` on a lent GPU machine, from the repository root. The GPU image lacks bitsandbytes,
# so it travels as a slimmed copy of the package in .gpu_site/ (Python files + libbitsandbytes_cuda130.so
# + libbitsandbytes_cpu.so, 4.4 MB; not committed): see the closing lines of benchmarks/RESULTS.md.
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu_site:$PWD PYTHONUNBUFFERED=1
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, bitsandbytes; print('torch', torch.__version__, '· triton', triton.__version__, '· bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout 60 python3 benchmarks/gpu_nf4_blocks.py 2>&1 | tail -n 8 | tee "$OUT/blocks.log"
timeout 240 python3 -m course_lib.bench nf4 --repeats 7 --json "$OUT/nf4.json" 2>&1 | grep -v -i warn | tail -n 8 | tee "$OUT/nf4.log"
