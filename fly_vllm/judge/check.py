"""``fly-vllm judge check MINE_DIR``: do the mined features mean what they say?

Mining records the judge features inside vLLM's verification step, through
the call serving makes (``features.components``), so training and serving see
the same numbers by construction. What that leaves to check is the meaning:
that ``h_post`` is the target's final hidden state *at the draft token's own
position* and ``h_pre`` the one before it. This recomputes both for a few
labelled mismatches with Hugging Face transformers, a second implementation
of the same model, on ``prompt + answer[:pos] + [draft]``, and reports the
relative difference (float32: expect about 1e-5 to 1e-3, kernels differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fly_vllm.judge.head import JudgeHead


def _answers(mine: Path) -> dict[int, dict]:
    from fly_vllm.judge.mine import item_index

    out = {}
    for f in sorted((mine / "chunks").glob("chunk-*.json")):
        for it in json.loads(f.read_text())["items"]:
            if "token_ids" in it:
                out[item_index(it["item"])] = it
    return out


def check_features(mine: str | Path, model: str, n: int = 5, head: str | None = None
                   ) -> list[dict]:
    """Recompute h_post / h_pre for ``n`` mined rows (distinct items first);
    one dict per row: relative L2 difference of each, and, with a head, the
    difference of its score on the recorded and recomputed features."""
    import torch
    from transformers import AutoModelForCausalLM

    mine = Path(mine)
    data = dict(np.load(mine / "dataset.npz"))
    answers = _answers(mine)
    rows, seen = [], set()
    for r, it in enumerate(data["item"]):
        if int(it) in answers and int(it) not in seen:
            rows.append(r)
            seen.add(int(it))
        if len(rows) >= n:
            break
    lm = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    lm.eval()
    scorer = JudgeHead.load(head) if head else None
    out = []
    for r in rows:
        a = answers[int(data["item"][r])]
        p = int(data["pos"][r])
        ids = a["prompt_token_ids"] + a["token_ids"][:p] + [int(data["draft"][r])]
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        res = {"item": int(data["item"][r]), "pos": p, "length": len(ids)}
        for name, ref in (("h_post", hs[-1]), ("h_pre", hs[-2])):
            got = torch.from_numpy(data[name][r])
            res[f"{name}_rel_diff"] = float((got - ref).norm() / ref.norm())
        if scorer is not None:
            from fly_vllm.judge.features import assemble

            parts = {k: data[k][r:r + 1] for k in data if k in scorer.features}
            mined = scorer.score_numpy(assemble(parts, scorer.features))[0]
            parts.update(h_post=hs[-1:].numpy(), h_pre=hs[-2:-1].numpy())
            again = scorer.score_numpy(assemble(parts, scorer.features))[0]
            res["score_diff"] = float(abs(mined - again))
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fly-vllm judge check", description=__doc__.split("\n\n")[0])
    ap.add_argument("mine", help="the mining folder")
    ap.add_argument("--model", default=None, help="the target (default: meta.json's)")
    ap.add_argument("--n", type=int, default=5, help="rows to recompute (5)")
    ap.add_argument("--head", default=None, help="also compare this head's scores")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    mine = Path(args.mine)
    if not (mine / "dataset.npz").exists():
        print(f"fly-vllm judge check: {mine}/dataset.npz not found (run `fly-vllm judge "
              "mine` first)", file=sys.stderr)
        return 2
    model = args.model or json.loads((mine / "meta.json").read_text())["pair"]["target"]
    rows = check_features(mine, model, args.n, args.head)
    for r in rows:
        print(json.dumps(r))
    worst = max((max(r["h_post_rel_diff"], r["h_pre_rel_diff"]) for r in rows), default=None)
    print(f"{len(rows)} rows; largest relative difference {worst:.2e}" if rows else "no rows")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
