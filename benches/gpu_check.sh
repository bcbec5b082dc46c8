#!/usr/bin/env bash
# The GPU check: one short script (a few minutes on an H100/H200), run when a GPU is lent.
#
#   bash benches/gpu_check.sh [out_dir]          (default: $OUT, else gpu_results)
#
# 1. Installs rlfuse with the GPU extra's packages that are present into the machine's python
#    (no network there: the package itself, against the torch already installed; wheels of
#    trl / liger-kernel placed in .whl/ are installed first when present).
# 2. Runs the Triton path's parity tests on the device (tests/test_cuda.py).
# 3. Times linear_logprobs and policy_loss forward+backward in bf16 at N 8192, H 4096, V 131072
#    (the `gpu-8k` preset) against naive torch, TRL's chunked head, Liger and the bf16 GEMM
#    floor: ms, effective TFLOP/s and torch.cuda.max_memory_allocated, to the terminal and to
#    <out_dir>/*.json|csv.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
"$py" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
status=0
"$py" -m pytest tests/test_cuda.py tests/test_triton.py -q || status=1
for op in linear_logprobs policy_loss; do
  "$py" -m rlfuse.benches.cli "$op" --shape gpu-8k --dtype bf16 --mode full --device cuda \
    --providers rlfuse-triton,naive,trl,liger,floor --reps 10 --out "$out" --no-plot --quiet || status=1
done
exit $status
