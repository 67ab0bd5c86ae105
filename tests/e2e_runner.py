"""Runs one offline vLLM job in a fresh process and prints its result as JSON.

Usage: python -m tests.e2e_runner JOB.json OUT.json

A job: {"model", "speculative_config" (or null), "prompts", "sampling":
{SamplingParams kwargs} (or a list, one per prompt; sampled prompts get
seed 1000 + their index unless they give one), "json_schema", "max_tokens" (per prompt),
"extra_args" (per prompt), "max_num_seqs", "engine" (more LLM(...) keyword
arguments, e.g. tensor_parallel_size), "env" (variables set before vLLM is
imported) (all optional)}. The result: token ids per
prompt, texts, and every vllm:* counter from LLM.get_metrics().
Each job gets its own process, as vLLM engines are not meant to be built
many times in one process.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    job = json.load(open(sys.argv[1]))
    os.environ.update(job.get("env", {}))
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(
        model=job["model"],
        speculative_config=job.get("speculative_config"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        disable_log_stats=False,
        seed=0,
        max_num_seqs=job.get("max_num_seqs", 8),
        # A random model would otherwise ramble in JSON whitespace.
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        **job.get("engine", {}),
    )
    params = []
    for i, _ in enumerate(job["prompts"]):
        sampling = job["sampling"]
        kw = dict(sampling[i] if isinstance(sampling, list) else sampling)
        if kw.get("temperature", 0) > 0:
            kw.setdefault("seed", 1000 + i)
        if job.get("max_tokens"):  # per prompt
            kw["max_tokens"] = job["max_tokens"][i]
        if job.get("extra_args"):
            kw["extra_args"] = job["extra_args"][i]
        if job.get("json_schema"):
            kw["structured_outputs"] = StructuredOutputsParams(json=job["json_schema"])
        params.append(SamplingParams(**kw))
    outs = llm.generate(job["prompts"], params, use_tqdm=False)
    metrics = {}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:"):
            continue
        key = m.name + "".join(f"[{k}={v}]" for k, v in sorted(m.labels.items())
                               if k in ("position", "rule", "path"))
        if hasattr(m, "values"):
            metrics[key] = list(m.values)
        elif hasattr(m, "value"):
            metrics[key] = m.value
    from fly_vllm import request_stats

    result = {
        "fly_stats": request_stats(outs),
        "request_ids": [o.request_id for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "metrics": metrics,
    }
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
