#!/usr/bin/env bash
# The course's GPU check, run on a lent GPU machine from the repository root with wheels for what
# its image lacks in .whl/ (the Jupyter kernel stack): installs them to /tmp/site, records the
# device, runs lesson 00 through `course-lab --profile gpu`, and checks that a hub id fails fast
# offline. Results go to $OUT (or ./gpu_out), to be copied into benchmarks/RESULTS.md by hand.
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], '· torch', torch.__version__, '· transformers', transformers.__version__)"
} | tee "$OUT/device.txt"
start=$(date +%s)
python3 -m course_lib.lab --profile gpu --only 00 --out "$OUT/lab" 2>&1 | tail -n 20 | tee "$OUT/lab.log"
echo "lab wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/lab.log"
start=$(date +%s)
timeout 120 python3 -c "
from course_lib.models import load_model
try:
    load_model('TinyLlama/TinyLlama-1.1B-Chat-v1.0')
except OSError as e:
    print('hub id offline ->', str(e)[:160])
" 2>&1 | tail -n 2 | tee "$OUT/hub.log"
echo "hub failure seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/hub.log"
