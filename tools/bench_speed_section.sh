#!/usr/bin/env bash
# The README's speed section, re-measured in one paired run (edgebox beside llama.cpp).
#
#     tools/bench_speed_section.sh [MODEL_DIR] > speed.log 2>&1
#
# MODEL_DIR holds the 7B-shaped files of `python tools/make_bench_models.py MODEL_DIR --types
# Q4_0,Q8_0,Q4_K_M` (default ./bench-models). Needs llama-cpp-python in this Python, and root for
# the start-up bench's page-cache drops. About 60 min on 2 cores; every step prints its progress,
# and the log keeps the commit, the CPU and the time between the steps.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench-models}
M=$DIR/deepseek-llm-7b-shape
step() { echo "== $(date -u +%H:%M:%S) $*"; "$@"; }

echo "== commit $(git rev-parse --short HEAD), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
step python -m edgebox.cli bench --startup "$M-Q4_0.gguf" --vs-llama-cpp --rounds 3
for t in Q4_0 Q4_K_M Q8_0; do
    step python -m edgebox.cli bench "$M-$t.gguf" --prompt 64,512 --vs-llama-cpp --rounds 3 --concurrency 8
done
step python -m edgebox.cli bench "$M-Q4_0.gguf" --prompt 8 --n-decode 64 --vs-llama-cpp --rounds 4
step python tools/bench_host_overhead.py "$M-Q4_0.gguf" --chips 1,4 --steps 24
step python tools/bench_kv_types.py "$M-Q4_0.gguf" --context 2048 --types f16,q8_0 --llama-cpp
step python tools/bench_speculative.py accept
step python tools/bench_speculative.py verify "$M-Q4_0.gguf" --chips 4 --ctx 256 --rounds 4
CACHE=$(mktemp -d)
for chips in 4 1; do
    step python tools/bench_swap.py "$M-Q4_0.gguf" "$M-Q4_K_M.gguf" --chips $chips --reps 3 --cache-dir "$CACHE"
done
rm -rf "$CACHE"
echo "== $(date -u +%H:%M:%S) done"
