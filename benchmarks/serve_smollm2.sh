#!/usr/bin/env bash
# The serving benchmark on this CPU machine, from the outside: the embedded
# SmolLM2-135M served twice by `fly-vllm serve` (multiprocess engine, as in
# production), once with FLy over n-gram drafting and once without
# speculation, driven through HTTP by benchmarks/bench_serve.py.
# Endpoints: nospec (baseline), strict (the FLy server with per-request
# fly_strict), fly. Usage: bash benchmarks/serve_smollm2.sh [OUT] [bench_serve args]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/serve-smollm2-ngram}
shift || true
py=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_HOST_IP=127.0.0.1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
model=$($py -m fly_vllm.models)
common=(--host 127.0.0.1 --enforce-eager --max-model-len 2048 --max-num-seqs 16)
mkdir -p "$out"
pids=()
trap 'kill -- "${pids[@]/#/-}" 2>/dev/null || true' EXIT
setsid $py -m fly_vllm.cli serve "$model" --port 8101 "${common[@]}" \
  --speculative-config configs/smollm2-demo-ngram.json >"$out/server-fly.log" 2>&1 &
pids+=($!)
setsid $py -m fly_vllm.cli serve "$model" --port 8102 "${common[@]}" \
  >"$out/server-nospec.log" 2>&1 &
pids+=($!)
for port in 8101 8102; do
  for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
  done
  curl -fs "http://127.0.0.1:$port/health" >/dev/null || { echo "server on $port did not start" >&2; exit 1; }
done
$py benchmarks/bench_serve.py --out "$out" \
  --endpoint nospec=http://127.0.0.1:8102 \
  --endpoint strict=http://127.0.0.1:8101 --xargs 'strict={"fly_strict": true}' \
  --endpoint fly=http://127.0.0.1:8101 \
  --datasets gsm8k,humaneval,mtbench --limit 8 --max-tokens 128 \
  --concurrency 1,4,16 --rounds 2 "$@"
