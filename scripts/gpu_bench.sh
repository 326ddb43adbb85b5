#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, on a bare GPU host: one H200-class GPU with torch (CUDA) and transformers
# installed, no network, this checkout, and a few wheels. Random weights in real shapes are built on the GPU (no
# embedded model, no hub); then:
#   1. the CUDA tests of the attention kernels (tests/backends/test_hf_kernels.py -k cuda);
#   2. `klservice bench --preset gpu` at the SmolLM2-1.7B shape: (a) ragged, (b) GRPO, (f) agentic, (d) one long
#      sequence, (e) a small request under a flood;
#   3. the same at the 7B Llama shape: (b), (f), (d), one timed round each.
# Each bench prints its table with the targets (bfloat16; (b) service / naive >= 1.6x, (f) >= 4.0x, service /
# in-process >= 0.95x, (d) extra memory <= 25% of full-vocab float32 logits) and writes bench-gpu/<shape>/.
#
# Python packages the host lacks travel as wheels in .whl/ (keep it out of git: .git/info/exclude), installed
# into a private folder without network. What this project needs there (about 10 MB, for Python 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl grpcio==1.85.3 protobuf==7.36.2 \
#       grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
# (add transformers and its dependencies to run another transformers than the host's).
#
#   bash scripts/gpu_bench.sh                  # everything (about 8-9 minutes on an H200)
#   bash scripts/gpu_bench.sh smollm2-1.7b     # one shape
#   SKIP_TESTS=1 bash scripts/gpu_bench.sh     # without the kernel tests
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT_DIR:-bench-gpu}"
CACHE="${KLSERVICE_CACHE_DIR:-/tmp/klservice-cache}"
SITE="${KLSERVICE_SITE:-/tmp/klservice-site}"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(smollm2-1.7b llama-7b)

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}", flush=True)
EOF

status=0
began=$SECONDS
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "===== CUDA kernel tests"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/backends/test_hf_kernels.py -k cuda || status=$?
    echo "(kernel tests: $((SECONDS - began)) s)"
fi
for shape in "${shapes[@]}"; do
    case "$shape" in
        smollm2-1.7b) workloads=a,b,f,d,e; extra=() ;;
        llama-7b) workloads=b,f,d; extra=(--repeats 1) ;;
        *) echo "unknown shape $shape (smollm2-1.7b, llama-7b)"; exit 2 ;;
    esac
    echo "===== $shape: $workloads"
    started=$SECONDS
    "$PYTHON" -m klservice bench --preset gpu --model-shape "$shape" --workloads "$workloads" "${extra[@]}" \
        --cache-dir "$CACHE" --no-progress --out "$OUT/$shape" || status=$?
    echo "($shape: $((SECONDS - started)) s)"
done
echo "all: $((SECONDS - began)) s, exit $status"
exit "$status"
