"""Start an engine from a fly.json written by `fly-vllm calibrate` and check
that it agrees with the target as often as calibrate said.

    python benchmarks/check_calibrated.py --model TARGET \
        --config benchmarks/results/qwen-pair/calibrate/fly.json \
        --rows benchmarks/results/qwen-pair/calibrate/rows.json \
        --prompts benchmarks/results/qwen-pair/calibrate/prompts.jsonl --dtype bfloat16

The reference is per-request strict on the same engine (the target's own
greedy output); the check runs the prompts again with no override, so the
config's own settings decide. It prints one JSON line: the agreement, the
prompts that differ and what calibrate reported. Use the calibration's
--max-tokens, --max-num-seqs and --dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="the fly.json calibrate wrote")
    ap.add_argument("--rows", required=True, help="calibrate's --json output")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--agreement", choices=("answer", "exact"), default="answer")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=30)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    # The result line goes to stdout, vLLM's log to stderr (set before vLLM loads).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    from fly_vllm.bench.offline import worker_env
    from fly_vllm.calibrate import answer_of, disagreements, generate_texts, read_prompts
    from fly_vllm.config import load_speculative_config

    spec = load_speculative_config(args.config)
    prompts = read_prompts(args.prompts)
    chosen = json.load(open(args.rows, encoding="utf-8"))["chosen"]
    os.environ.update(worker_env(dict(os.environ)))
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, speculative_config=spec, enforce_eager=True, dtype=args.dtype,
              max_model_len=2048, seed=0, max_num_seqs=args.max_num_seqs)

    def texts(extra):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, extra_args=extra)
        return generate_texts(llm, prompts, params)

    t0 = time.perf_counter()
    ref = [answer_of(t, args.agreement) for t in texts({"fly": {"strict": True}})]
    differ = disagreements(texts(None), ref, prompts, args.agreement)
    print(json.dumps({"config_fly": spec.get("fly"), "agree": len(prompts) - len(differ),
                      "n": len(prompts), "disagree": differ,
                      "calibrate_said": None if chosen is None else chosen["agree"],
                      "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
