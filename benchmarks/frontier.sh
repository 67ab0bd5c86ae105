#!/usr/bin/env bash
# The quality/acceptance frontier of loose verification on the Qwen2.5-Coder
# 1.5B/0.5B pair (benchmarks/results/frontier/README.md says what it found).
#
#   bash benchmarks/frontier.sh [STEPS]      (default: screen,eval,speed,report)
#
# screen  calibration set: GSM8K train items 0..SCREEN_N-1, every point of
#         benchmarks/frontier_points/{strict,screen-gates,screen-more}.json
# eval    evaluation set, disjoint: GSM8K train items EVAL_SKIP..EVAL_SKIP+EVAL_N-1
#         and all 164 HumanEval problems; the target alone, strict at each K
#         used and the points of frontier_points/eval.json, chosen on the screen,
#         in the file's order, in parts of EVAL_PART items, each cached: part 1 of
#         every mode, then part 2, ..., the parts in EVAL_FIRST first
#         (EVAL_CACHED=1 scores what has run)
# speed   one request at a time (and SPEED_AT at once) on SPEED_N GSM8K items
#         of the evaluation set, ROUNDS interleaved rounds (each a fresh folder)
# report  benchmarks/frontier.py: summary.json, frontier.png, tables.md
#
# Quality runs: fp32 (bf16 on this machine is noisier than the effect measured:
# results/frontier/bf16-noise/), greedy, 30 requests at once, 512 new tokens.
# Every run is cached under its folder's raw/, so an interrupted step resumes.
# SCREEN_CACHED=1 / EVAL_CACHED=1 (with the report step): score what has run.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-screen,eval,speed,report}
step() { [[ ,$steps, == *,$1,* ]]; }
py=.venv/bin/python
out=benchmarks/results/frontier
pts=benchmarks/frontier_points
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SCREEN_N=${SCREEN_N:-100}
EVAL_SKIP=${EVAL_SKIP:-1000}
EVAL_N=${EVAL_N:-500}
EVAL_PART=${EVAL_PART:-133}   # items per engine run: a stopped eval resumes per part
# Parts to run first: 5 (HumanEval 32-163) and 4 (GSM8K 1399-1499, HumanEval
# 0-31) before 3, so that HumanEval is measured before the last GSM8K items.
EVAL_FIRST=${EVAL_FIRST:-1,2,5,4}
SPEED_N=${SPEED_N:-16}
SPEED_AT=${SPEED_AT:-4}
SPEED_TOKENS=${SPEED_TOKENS:-256}
SPEED_DTYPE=${SPEED_DTYPE:-bfloat16}
ROUNDS=${ROUNDS:-2}

paths=$($py -m fly_vllm.pairs qwen2.5-coder)
target=$(sed -n 1p <<<"$paths")
draft=$(sed -n 2p <<<"$paths")
quality=(--model "$target" --drafter "$draft" --temperatures 0 --concurrency 30
         --max-tokens 512 --engine '{"dtype": "float32", "max_model_len": 2048}')

# One harness call per folder: its results.json scores the modes of that call
# only. SCREEN_CACHED=1 scores the screen points already run, runs nothing.
screen_points=()
for f in strict screen-gates screen-more; do
  [[ -f $pts/$f.json ]] && screen_points+=(--points "$pts/$f.json")
done
screen_args=("${quality[@]}" --out "$out/screen" --datasets gsm8k --limit "$SCREEN_N"
             --modes nospec,points "${screen_points[@]}")
if step screen; then
  $py benchmarks/run_bench.py "${screen_args[@]}"
fi
if [[ ${SCREEN_CACHED:-0} == 1 ]]; then
  $py benchmarks/run_bench.py "${screen_args[@]}" --cached-only
fi

eval_args=("${quality[@]}" --out "$out/eval"
           --datasets gsm8k,humaneval --limit "gsm8k=$EVAL_N,humaneval=164"
           --skip "gsm8k=$EVAL_SKIP" --modes nospec,points --points "$pts/eval.json"
           --part-size "$EVAL_PART" --part-order part --parts-first "$EVAL_FIRST")
if step eval; then
  $py benchmarks/run_bench.py "${eval_args[@]}"
fi
# EVAL_CACHED=1: score the evaluation modes that have finished, run nothing.
if [[ ${EVAL_CACHED:-0} == 1 ]]; then
  $py benchmarks/run_bench.py "${eval_args[@]}" --cached-only
fi

if step speed; then
  for r in $(seq 1 "$ROUNDS"); do
    $py benchmarks/run_bench.py --model "$target" --drafter "$draft" --temperatures 0 \
      --max-tokens "$SPEED_TOKENS" --concurrency "1,$SPEED_AT" \
      --engine "{\"dtype\": \"$SPEED_DTYPE\", \"max_model_len\": 2048}" \
      --out "$out/speed/round-$r" --datasets gsm8k --limit "$SPEED_N" \
      --skip "gsm8k=$EVAL_SKIP" --modes nospec,points --points "$pts/speed.json"
  done
fi

if step report; then
  speed=()
  [[ -f $out/speed/round-1/results.json ]] && speed=(--speed "$out/speed")
  evald=()
  [[ -f $out/eval/results.json ]] && evald=(--eval "$out/eval")
  $py benchmarks/frontier.py --screen "$out/screen" "${evald[@]}" "${speed[@]}" --out "$out"
fi
