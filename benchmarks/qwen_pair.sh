#!/usr/bin/env bash
# Quality retention and speed of the real same-family pair on this CPU:
# Qwen2.5-Coder-1.5B-Instruct (target) with its 0.5B (draft), bf16, greedy.
#
#   bash benchmarks/qwen_pair.sh [OUT]      (default benchmarks/results/qwen-pair)
#
# 1. fetches and converts the pair (python -m fly_vllm.pairs qwen2.5-coder);
# 2. retention: GSM8K train items and all 164 HumanEval problems, RETENTION_AT
#    requests at once, modes $RETENTION_MODES; accuracy, retention with its
#    bootstrap interval, paired flips with McNemar's p, final-answer agreement;
# 3. every difference between strict SD and the target explained (near-tie or
#    not: benchmarks/explain_divergence.py);
# 4. the sweep on the GSM8K items, where FLy loses most: thresholds
#    SWEEP_THRESHOLDS at W, and windows SWEEP_WINDOWS at threshold 0.3 (W=3 is
#    FLy's own default for K=4);
# 5. speed against requests at once: AT_ONCE_LIMIT items per dataset at 1 and
#    3 at once, every mode (30 at once is the retention run itself);
# 6. the quality guards: FLy with the digit guard, and with the EOS/stop
#    guard, on the retention items, beside a fresh FLy run so their speeds
#    come from one session (the no-spec run of step 2 is reused);
# 7. FSD (rule fsd, JS) at FSD_THRESHOLDS on the retention items, and its
#    `fallback` variant at the same thresholds on the GSM8K items;
# 8. calibration: `fly-vllm calibrate` on CALIB_N GSM8K items held out from
#    the retention items (items GSM8K_N .. GSM8K_N + CALIB_N - 1), once over
#    FLy's threshold x window grid and once over FSD's JS threshold (the
#    `fallback` variant, which keeps native matches at a tight T).
# Sizes and modes can be changed through the variables below; every run is
# cached under OUT/*/raw, so an interrupted run resumes where it stopped.
# STEPS (default 2,3,4,5,6,7,8) picks steps; step 1 always runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/qwen-pair}
py=.venv/bin/python
make install-models >/dev/null  # the venv, gguf and accelerate for the conversion
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
GSM8K_N=${GSM8K_N:-150}
HUMANEVAL_N=${HUMANEVAL_N:-164}
MAX_TOKENS=${MAX_TOKENS:-512}
RETENTION_AT=${RETENTION_AT:-30}
RETENTION_MODES=${RETENTION_MODES:-nospec,fly,strict,fly-ngram}
SWEEP_THRESHOLDS=${SWEEP_THRESHOLDS:-0.9}
SWEEP_WINDOWS=${SWEEP_WINDOWS:-3}
AT_ONCE_LIMIT=${AT_ONCE_LIMIT:-4}
AT_ONCE_TOKENS=${AT_ONCE_TOKENS:-64}
FSD_THRESHOLDS=${FSD_THRESHOLDS:-0.1,0.4}
CALIB_N=${CALIB_N:-60}
CALIB_RETENTION=${CALIB_RETENTION:-0.95}
CALIB_TOKENS=${CALIB_TOKENS:-512}
CALIB_THRESHOLDS=${CALIB_THRESHOLDS:-0.3,0.6,0.9,1.05}
CALIB_WINDOWS=${CALIB_WINDOWS:-2,3}
CALIB_FSD_THRESHOLDS=${CALIB_FSD_THRESHOLDS:-0.02,0.05,0.1,0.2}
STEPS=${STEPS:-2,3,4,5,6,7,8}
step() { [[ ,$STEPS, == *,$1,* ]]; }
K=${K:-4}
W=${W:-2}

paths=$($py -m fly_vllm.pairs qwen2.5-coder)
target=$(sed -n 1p <<<"$paths")
draft=$(sed -n 2p <<<"$paths")
common=(--model "$target" --drafter "$draft" -k "$K" --window "$W" --threshold 0.3
        --temperatures 0 --engine '{"dtype": "bfloat16", "max_model_len": 2048}')

if step 2; then
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/retention" \
    --modes "$RETENTION_MODES" --datasets gsm8k,humaneval \
    --limit "gsm8k=$GSM8K_N,humaneval=$HUMANEVAL_N" --max-tokens "$MAX_TOKENS" \
    --concurrency "$RETENTION_AT"
fi

if step 3; then
  $py benchmarks/explain_divergence.py "$out/retention" --mode strict
fi

if step 4; then
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/sweep" \
    --modes nospec,sweep --sweep-threshold "$SWEEP_THRESHOLDS" --sweep-window "$SWEEP_WINDOWS" \
    --datasets gsm8k --limit "$GSM8K_N" --max-tokens "$MAX_TOKENS" \
    --concurrency "$RETENTION_AT"
fi

if step 5; then
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/at-once" \
    --modes nospec,strict,fly,fly-ngram --datasets gsm8k,humaneval \
    --limit "$AT_ONCE_LIMIT" --max-tokens "$AT_ONCE_TOKENS" --concurrency 1,3
fi

# The no-spec run of step 2 (found by its mode in raw/) serves steps 6 and 7.
reuse_nospec() {
  mkdir -p "$1/raw"
  for f in "$out"/retention/raw/*.json; do
    if grep -q '"mode": "no-spec"' "$f"; then cp -n "$f" "${f%.json}.log" "$1/raw/"; fi
  done
}
same=(--datasets "gsm8k,humaneval" --limit "gsm8k=$GSM8K_N,humaneval=$HUMANEVAL_N"
      --max-tokens "$MAX_TOKENS" --concurrency "$RETENTION_AT")

if step 6; then
  reuse_nospec "$out/guards"
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/guards" \
    --modes nospec,fly,fly-digits,fly-eos "${same[@]}"
fi

if step 7; then
  reuse_nospec "$out/fsd"
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/fsd" \
    --modes nospec,fsd --fsd-threshold "$FSD_THRESHOLDS" "${same[@]}"
  # GSM8K only, where the rule matters most; its no-spec run is GSM8K's alone
  # (a fresh one unless already in fsd-fallback/raw).
  $py benchmarks/run_bench.py "${common[@]}" --out "$out/fsd-fallback" \
    --modes nospec,fsd-fallback --fsd-threshold "$FSD_THRESHOLDS" --datasets gsm8k \
    --limit "gsm8k=$GSM8K_N" --max-tokens "$MAX_TOKENS" --concurrency "$RETENTION_AT"
fi

if step 8; then
  mkdir -p "$out/calibrate"
  $py - "$GSM8K_N" "$CALIB_N" >"$out/calibrate/prompts.jsonl" <<'PY'
import json, sys
from fly_vllm.bench.datasets import load_gsm8k
start, n = int(sys.argv[1]), int(sys.argv[2])
for it in load_gsm8k(start + n)[start:]:
    print(json.dumps({"id": it.id, "messages": it.messages}))
PY
  calib=(--model "$target" --prompts "$out/calibrate/prompts.jsonl"
         --retention "$CALIB_RETENTION" --agreement answer --dtype bfloat16
         --max-tokens "$CALIB_TOKENS" --max-num-seqs "$RETENTION_AT")
  spec=$(printf '{"method": "fly", "model": "%s", "num_speculative_tokens": %s}' "$draft" "$K")
  $py -m fly_vllm.cli calibrate "${calib[@]}" --speculative-config "$spec" \
    --thresholds "$CALIB_THRESHOLDS" --windows "$CALIB_WINDOWS" \
    --out "$out/calibrate/fly.json" --json "$out/calibrate/rows.json" \
    --plot "$out/calibrate/curve.png" \
    | tee "$out/calibrate/table.txt"
  spec=$(printf '{"method": "fly", "model": "%s", "num_speculative_tokens": %s, "fly": {"rule": "fsd", "fsd_variant": "fallback"}}' "$draft" "$K")
  $py -m fly_vllm.cli calibrate "${calib[@]}" --speculative-config "$spec" \
    --thresholds "$CALIB_FSD_THRESHOLDS" \
    --out "$out/calibrate/fsd.json" --json "$out/calibrate/fsd-rows.json" \
    --plot "$out/calibrate/fsd-curve.png" \
    | tee "$out/calibrate/fsd-table.txt"
fi
