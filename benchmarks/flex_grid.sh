#!/usr/bin/env bash
# Issue "multi-level acceleration and flex decoding": throughput and time per
# output token against batch size on this CPU, with the real Qwen2.5-Coder
# pair (1.5B target, 0.5B draft, bf16, greedy, K=4, W=2, threshold 0.3).
#
#   bash benchmarks/flex_grid.sh [OUT]     (default benchmarks/results/flex)
#
# 1. grid: no speculation, strict SD, FLy, FLy + multi-level drafter at
#    BATCHES requests at once, on GSM8K items (ITEMS_AT items per batch size,
#    so a batch of 64 is really 64 requests), MAX_TOKENS new tokens; the
#    default of fly.flex_max_batch is read off this step (FLy against no
#    speculation);
# 2. the same grid with FLy + flex decoding (its defaults: confidence 0.01,
#    schedule "auto", idle drafter skipped) added; step 1's runs are reused;
# 3. the multi-level drafter alone against plain FLy, one request at a time,
#    on GSM8K and HumanEval (MLA_N items each, MLA_TOKENS new tokens).
# Each run is cached under OUT/*/raw, so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/flex}
py=.venv/bin/python
make install-models >/dev/null
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
BATCHES=${BATCHES:-1,2,4,16,64}
ITEMS_AT=${ITEMS_AT:-1=4,2=6,4=8,16=32,64=64}
MAX_TOKENS=${MAX_TOKENS:-128}
MLA_N=${MLA_N:-8}
MLA_TOKENS=${MLA_TOKENS:-256}
STEPS=${STEPS:-1,2,3}

paths=$($py -m fly_vllm.pairs qwen2.5-coder)
target=$(sed -n 1p <<<"$paths")
draft=$(sed -n 2p <<<"$paths")
common=(--model "$target" --drafter "$draft" -k 4 --window 2 --threshold 0.3
        --temperatures 0 --engine '{"dtype": "bfloat16", "max_model_len": 2048}')
grid=(--datasets gsm8k --limit "gsm8k=64" --limit-at "$ITEMS_AT"
      --max-tokens "$MAX_TOKENS" --concurrency "$BATCHES")

if [[ ,$STEPS, == *,1,* ]]; then
  $py benchmarks/run_bench.py "${common[@]}" "${grid[@]}" --out "$out/grid" \
    --modes nospec,strict,fly,fly-multilevel
fi
if [[ ,$STEPS, == *,2,* ]]; then
  $py benchmarks/run_bench.py "${common[@]}" "${grid[@]}" --out "$out/grid" \
    --modes nospec,strict,fly,fly-multilevel,fly-flex
fi
if [[ ,$STEPS, == *,3,* ]]; then
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/multilevel" \
    --datasets gsm8k,humaneval --limit "$MLA_N" --max-tokens "$MLA_TOKENS" \
    --concurrency 1 --modes fly,fly-multilevel
fi
