#!/usr/bin/env bash
# The learned judge on the Qwen2.5-Coder 1.5B/0.5B pair
# (benchmarks/results/judge/README.md says what it found).
#
#   bash benchmarks/judge.sh [STEPS]      (default: mine,train,check)
#
# mine    fly-vllm judge mine: GSM8K-train items MINE_SKIP..MINE_SKIP+MINE_N-1
#         (default 100..699: after the frontier's calibration items 0-99, before
#         its evaluation items 1000-1499), strict K 4, fp32, PER_ANSWER swaps per
#         answer, in chunks of CHUNK items that are kept: a stopped run resumes.
#         The mining folder MINE_DIR holds the features (about 12 KB a label),
#         so it lives outside the repository; its meta.json and the labels
#         (labels.csv: item, position, tokens, label) are copied here.
# train   fly-vllm judge train --features auto on what has been mined: the head
#         and its report (report.md, report.json, pr.png), the labels and the
#         mining meta land in HEAD_DIR (default: here).
# check   fly-vllm judge check: 5 mined rows recomputed with transformers.
# assess  fly-vllm judge assess: the head ASSESS_HEAD (default: here) on
#         MINE_DIR's items that it was not mined on, into
#         HEAD_DIR/assess-ASSESS_NAME.{json,txt}.
# screen  the judge points of frontier_points/judge.json on the frontier's
#         screen items (GSM8K 0-99, 30 at once, fp32, 512 tokens) in
#         $out/screen, beside the target and strict runs, whose cached
#         outputs are taken from the frontier's screen (nothing reruns them).
# eval    the judge points of frontier_points/judge-eval.json (chosen on the
#         screen) on the frontier's evaluation items (GSM8K 1000-1499 and
#         HumanEval, in parts of 133 items, EVAL_FIRST first), beside the
#         target, strict K 8 and the margin gate's K 8 point, whose complete
#         runs are taken from the frontier's evaluation. EVAL_CACHED=1 scores
#         what has run (a stopped run: its first parts) and runs nothing.
# speed   one request at a time and SPEED_AT at once, bf16, on SPEED_N GSM8K
#         items of the evaluation set, the points of frontier_points/
#         judge-speed.json (the fastest strict K, strict K 8 and the judge's
#         held-out point), ROUNDS interleaved rounds, each a fresh folder
#         ($out/speed/round-N), as the frontier's speed step.
# The frontier's outputs copied into screen/raw and eval/raw are listed in
# each raw/.gitignore: they stay committed once, under frontier/.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-mine,train,check}
step() { [[ ,$steps, == *,$1,* ]]; }
py=.venv/bin/python
out=benchmarks/results/judge
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MINE_DIR=${MINE_DIR:-${FLY_VLLM_CACHE:-$HOME/.cache/fly-vllm}/judge/qwen2.5-coder-gsm8k}
MINE_SKIP=${MINE_SKIP:-100}
MINE_N=${MINE_N:-600}
PER_ANSWER=${PER_ANSWER:-8}
CHUNK=${CHUNK:-30}
HEAD_DIR=${HEAD_DIR:-$out}
ASSESS_HEAD=${ASSESS_HEAD:-$out/head.json}
ASSESS_NAME=${ASSESS_NAME:-head}
SPEED_N=${SPEED_N:-8}
SPEED_AT=${SPEED_AT:-4}
SPEED_TOKENS=${SPEED_TOKENS:-256}
ROUNDS=${ROUNDS:-2}
mkdir -p "$out" "$HEAD_DIR"

paths=$($py -m fly_vllm.pairs qwen2.5-coder)
target=$(sed -n 1p <<<"$paths")
draft=$(sed -n 2p <<<"$paths")

copy_labels() {
  cp "$MINE_DIR/meta.json" "$HEAD_DIR/mining-meta.json"
  $py - "$MINE_DIR/dataset.npz" "$HEAD_DIR/labels.csv" <<'PY'
import sys, numpy as np
d = np.load(sys.argv[1])
with open(sys.argv[2], "w") as f:
    f.write("item,pos,draft,target,important\n")
    for row in zip(d["item"], d["pos"], d["draft"], d["target"], d["important"]):
        f.write(",".join(str(int(x)) for x in row) + "\n")
PY
}

if step mine; then
  .venv/bin/fly-vllm judge mine --model "$target" --drafter "$draft" --out "$MINE_DIR" \
    --skip "$MINE_SKIP" --limit "$MINE_N" --per-answer "$PER_ANSWER" --k 4 \
    --chunk "$CHUNK" --concurrency 30 --dtype float32
fi
if step train; then
  copy_labels
  .venv/bin/fly-vllm judge train "$MINE_DIR" --features auto --out "$HEAD_DIR/head.json" \
    --report-dir "$HEAD_DIR/train-report"
fi
if step check; then
  .venv/bin/fly-vllm judge check "$MINE_DIR" --model "$target" --n 5 \
    --head "$HEAD_DIR/head.json" --json "$HEAD_DIR/check.json"
fi
if step assess; then
  .venv/bin/fly-vllm judge assess "$MINE_DIR" --head "$ASSESS_HEAD" \
    --threshold 6.72e-05 --json "$HEAD_DIR/assess-$ASSESS_NAME.json" \
    | tee "$HEAD_DIR/assess-$ASSESS_NAME.txt"
fi
# copy_runs FROM TO MODE...: the frontier's cached runs of these modes (all of
# FROM's when none is named) into TO, with their logs, listed in TO/.gitignore.
copy_runs() {
  local from=$1 to=$2; shift 2
  mkdir -p "$to"
  keep() {  # FILE: copy it from FROM unless TO has it; list it in TO/.gitignore
    [[ -e $to/$1 ]] || cp "$from/$1" "$to/"
    grep -qxF "$1" "$to/.gitignore" 2>/dev/null || echo "$1" >> "$to/.gitignore"
  }
  local f name mode wanted
  for f in "$from"/*.json; do
    mode=$($py -c 'import json, sys; print(json.load(open(sys.argv[1]))["mode"])' "$f")
    wanted=$(( $# == 0 ))
    for m in "$@"; do [[ $m == "$mode" ]] && wanted=1; done
    (( wanted )) || continue
    name=$(basename "$f" .json)
    keep "$name.json"
    [[ ! -e $from/$name.log ]] || keep "$name.log"
  done
}
quality=(--model "$target" --drafter "$draft" --temperatures 0 --concurrency 30
         --max-tokens 512 --engine '{"dtype": "float32", "max_model_len": 2048}')
if step screen; then
  copy_runs benchmarks/results/frontier/screen/raw "$out/screen/raw"
  $py benchmarks/run_bench.py "${quality[@]}" --out "$out/screen" --datasets gsm8k --limit 100 \
    --modes nospec,points --points benchmarks/frontier_points/judge.json
fi
eval_args=("${quality[@]}" --out "$out/eval" --datasets gsm8k,humaneval
           --limit gsm8k=500,humaneval=164 --skip gsm8k=1000 --modes nospec,points
           --points benchmarks/frontier_points/judge-eval.json --part-size 133
           --part-order part --parts-first "${EVAL_FIRST:-1,5,2,4}")
if step eval; then
  copy_runs benchmarks/results/frontier/eval/raw "$out/eval/raw" no-spec "strict K8" \
    "margin 0.3 K8 W6"
  if [[ ${EVAL_CACHED:-0} == 1 ]]; then
    $py benchmarks/run_bench.py "${eval_args[@]}" --cached-only
  else
    $py benchmarks/run_bench.py "${eval_args[@]}"
  fi
fi
if step speed; then
  for r in $(seq 1 "$ROUNDS"); do
    $py benchmarks/run_bench.py --model "$target" --drafter "$draft" --temperatures 0 \
      --max-tokens "$SPEED_TOKENS" --concurrency "1,$SPEED_AT" \
      --engine '{"dtype": "bfloat16", "max_model_len": 2048}' \
      --out "$out/speed/round-$r" --datasets gsm8k --limit "$SPEED_N" --skip gsm8k=1000 \
      --modes points --points benchmarks/frontier_points/judge-speed.json
  done
fi
