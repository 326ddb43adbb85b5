#!/usr/bin/env bash
# The GPU table of docs/benchmarks.md: `klservice bench --preset gpu` on random weights in the shapes of
# SmolLM2-1.7B and a 7B Llama (bfloat16), one run per shape, each workload short (the preset's sizes).
# On a GPU host with the CUDA build of torch and vLLM in the environment (`make install TORCH=torch`, then
# `.venv/bin/pip install vllm`); the vllm rows are skipped where vLLM is missing. Writes bench-gpu/<shape>/.
#   bash scripts/gpu_bench.sh                 # both shapes
#   bash scripts/gpu_bench.sh llama-7b        # one
set -euo pipefail
cd "$(dirname "$0")/.."
KLSERVICE="${KLSERVICE:-.venv/bin/klservice}"
OUT="${OUT_DIR:-bench-gpu}"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(smollm2-1.7b llama-7b)
status=0
for shape in "${shapes[@]}"; do
    echo "===== $shape"
    # (c) and the cache rows add little on a GPU at these sizes; (a), (b), (d), (e) and vllm are the GPU table.
    "$KLSERVICE" bench --preset gpu --model-shape "$shape" --workloads a,b,d,e,vllm --no-progress \
        --out "$OUT/$shape" || status=$?
done
exit "$status"
