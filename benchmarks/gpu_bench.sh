#!/usr/bin/env bash
# The benchmarks on a lent GPU machine, from the repository root: `course-bench all --device cuda` runs every
# benchmark (lora, sft, nf4, qlora, dpo, grpo) and writes ONE JSON file, $OUT/<date>-<gpu>.json, with each
# result (or its error: one failing benchmark does not stop the others), the machine and the date. Copy it
# into benchmarks/raw/ and run `python -m course_lib.bench.table` to put it in the README's table.
#   nf4    NF4 dequantization vs bitsandbytes (plain and double quant), bf16 copy ceiling
#   lora   LoRA train step vs peft (TinyLlama-1.1B shape, bf16, batch 8 × 512)
#   qlora  QLoRA vs LoRA memory and time, checkpointing on and off, course_lib and bnb + peft
#   sft, dpo, grpo  the alignment steps vs TRL's trainers (embedded model), like with like and TRL's defaults
# The GPU image lacks bitsandbytes, so it travels as a slimmed copy of the package in .gpu_site/
# (Python files + libbitsandbytes_cuda130.so + libbitsandbytes_cpu.so, 4.4 MB; not committed; make it
# with: python -c "import bitsandbytes, shutil, os; shutil.copytree(os.path.dirname(bitsandbytes.__file__),
# '.gpu_site/bitsandbytes', ignore=lambda d, names: [n for n in names if n.endswith('.so') and 'cuda130' not in n
# and 'cpu' not in n])" — and pass carry=[".gpu_site"]). ONLY=nf4,lora runs just those, one JSON file each
# (not read by the README's table, which takes `all` runs only). REPEATS=7 by default.
# Results go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu_site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
REPEATS=${REPEATS:-7}
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft, bitsandbytes; print('torch', torch.__version__, '· triton', triton.__version__, '· transformers', transformers.__version__, '· peft', peft.__version__, '· bitsandbytes', bitsandbytes.__version__)"
} 2>&1 | tee "$OUT/device.txt"
if [ -z "${ONLY:-}" ]; then
  start=$(date +%s)
  timeout 560 python3 -m course_lib.bench all --device cuda --repeats "$REPEATS" --json "$OUT" 2>&1 \
    | grep -v -i -E "warn|loading weights" | tee "$OUT/all.log" | tail -n 60
  echo "all: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
  exit 0
fi
for name in ${ONLY//,/ }; do
  start=$(date +%s)
  timeout 200 python3 -m course_lib.bench "$name" --device cuda --repeats "$REPEATS" --json "$OUT/$name.json" 2>&1 \
    | grep -v -i -E "warn|loading weights" | tail -n 12 | tee "$OUT/$name.log"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
done
