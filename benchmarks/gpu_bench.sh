#!/usr/bin/env bash
# The benchmarks that need a GPU, on a lent GPU machine, from the repository root:
#   course-bench nf4    NF4 dequantization vs bitsandbytes (plain and double quant), bf16 copy ceiling
#   course-bench lora   LoRA train step vs peft (TinyLlama-1.1B shape, bf16, batch 8 × 512)
#   course-bench qlora  QLoRA vs LoRA memory and time, checkpointing on and off, course_lib and bnb + peft
# The GPU image lacks bitsandbytes, so it travels as a slimmed copy of the package in .gpu_site/
# (Python files + libbitsandbytes_cuda130.so + libbitsandbytes_cpu.so, 4.4 MB; not committed; make it
# with: python -c "import bitsandbytes, shutil, os; shutil.copytree(os.path.dirname(bitsandbytes.__file__),
# '.gpu_site/bitsandbytes', ignore=lambda d, names: [n for n in names if n.endswith('.so') and 'cuda130' not in n
# and 'cpu' not in n])" — and pass carry=[".gpu_site"]). ONLY=nf4,lora picks benchmarks (default: all three).
# One call takes about 5 minutes; results go to $OUT (or ./gpu_out), to be copied into RESULTS.md.
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu_site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ONLY=${ONLY:-nf4,lora,qlora}
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft, bitsandbytes; print('torch', torch.__version__, '· triton', triton.__version__, '· transformers', transformers.__version__, '· peft', peft.__version__, '· bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$OUT/device.txt"
for name in ${ONLY//,/ }; do
  start=$(date +%s)
  timeout 200 python3 -m course_lib.bench "$name" --repeats 7 --json "$OUT/$name.json" 2>&1 | grep -v -i -E "warn|loading weights" | tail -n 12 | tee "$OUT/$name.log"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
done
