#!/usr/bin/env bash
# The course's GPU check, run on a lent GPU machine from the repository root with wheels for what
# its image lacks in .whl/ (the Jupyter kernel stack): installs them to /tmp/site, records the
# device, runs the lessons in $LESSONS (default 00,03) through `course-lab --profile gpu`, checks that
# a hub id fails fast offline, then (unless QUICK=1) `course-bench lora` and the multi-LoRA kernel.
# SKIP_LAB=1 skips the lessons.
# Results go to $OUT (or ./gpu_out), to be copied into benchmarks/RESULTS.md by hand.
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
[ "${SKIP_LAB:-0}" = 1 ] || python3 -m course_lib.lab --profile gpu --only "${LESSONS:-00,03}" --out "$OUT/lab" 2>&1 | tail -n 20 | tee "$OUT/lab.log"
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
[ "${QUICK:-0}" = 1 ] || timeout 300 python3 -m course_lib.bench lora --repeats 7 --json "$OUT/lora.json" 2>&1 | grep -v -i warn | tail -n 6 | tee "$OUT/lora.log"
timeout 120 python3 - <<'PY' 2>&1 | tail -n 8 | tee "$OUT/kernel.log"
import torch, triton
from course_lib.kernels.multi_lora import lora_mixed_delta_torch, lora_mixed_delta_triton
gen = torch.Generator(device="cuda").manual_seed(0)
Bt, T, IN, OUT, R, K = 8, 512, 2048, 2048, 16, 4
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(Bt, T, IN, device="cuda", generator=gen).to(dtype)
    A = (torch.randn(K + 1, R, IN, device="cuda", generator=gen) / IN ** 0.5).to(dtype); A[K] = 0
    B = (torch.randn(K + 1, OUT, R, device="cuda", generator=gen) / R ** 0.5).to(dtype); B[K] = 0
    idx = torch.tensor([0, 1, 2, 3, K, 0, 1, K], device="cuda")
    ref = lora_mixed_delta_torch(x.double(), A.double(), B.double(), idx)
    out = lora_mixed_delta_triton(x, A, B, idx, base_slot=K)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    ms_t = triton.testing.do_bench(lambda: lora_mixed_delta_triton(x, A, B, idx, base_slot=K), return_mode="median")
    ms_e = triton.testing.do_bench(lambda: lora_mixed_delta_torch(x, A, B, idx), return_mode="median")
    print(f"multi-LoRA delta {dtype}: rel err vs fp64 {rel:.2e}, base rows zero {bool((out[4] == 0).all())}, "
          f"triton {ms_t:.3f} ms, torch einsum {ms_e:.3f} ms")
PY
