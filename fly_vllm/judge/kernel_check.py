"""The judge score's check for ``fly-vllm selftest``: random heads and
verification steps, and the score on one path against another.

A step is vLLM's layout, as the sampler sees it: request b has n_b drafts and
n_b + 1 rows of ``hidden`` [R, H]; ``rows`` [T] is each draft's verifying
row, so h_pre = hidden[rows] and h_post = hidden[rows + 1] (features.py).

- On a GPU, or on the CPU under ``--interpret``: the Triton score
  (kernels/judge_score.py, as JudgeScore launches it) against the torch path.
- On the CPU otherwise: the torch path, which the plugin runs there, against
  the head's own unfolded score (``JudgeHead.logit_numpy``, what training
  computed), so the folding of the scaler into the weights is checked too.

Either way z [T] must agree within ``score.Z_RTOL`` of the terms' magnitude
``sum(|w'_i x_i|) + |b'|``: the paths add D terms in another order.
"""

from __future__ import annotations

import numpy as np
import torch

from fly_vllm.judge.features import SCALARS, assemble, components, width
from fly_vllm.judge.head import JudgeHead
from fly_vllm.judge.score import Z_RTOL, JudgeScore

# Which components a head reads: each hidden row alone, both, and all six
# (scalars around the hidden parts: weight slices at odd offsets).
SPECS = (("h_post",), ("h_pre",), ("h_post", "h_pre"),
         (SCALARS[0], "h_post", SCALARS[1], "h_pre", *SCALARS[2:]))
# T drafts x H: a batch of 4 at K 8, and of 64 at K 8, on a 70B-sized state.
TIMING_SHAPES = ((32, 8192), (512, 8192))


def random_head(spec, hidden_size: int, vocab: int, g: torch.Generator) -> JudgeHead:
    d = width(spec, hidden_size)

    def normal(n: int) -> np.ndarray:
        return torch.randn(n, generator=g, dtype=torch.float64).numpy()

    return JudgeHead(spec, normal(d), float(normal(1)[0]), normal(d) * 0.2,
                     0.5 + 1.5 * torch.rand(d, generator=g, dtype=torch.float64).numpy(), 0.5,
                     {"target": "selftest", "drafter": "selftest",
                      "hidden_size": hidden_size, "vocab_size": vocab})


def random_step(hidden_size: int, drafts: list[int], vocab: int, dtype: torch.dtype,
                device, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(hidden [R, H], rows [T] int32, target_logits [T, V] fp32,
    draft_token_ids [T]) for requests with ``drafts[b]`` drafts each."""
    rows, start = [], 0
    for n in drafts:
        rows += range(start, start + n)
        start += n + 1
    hidden = torch.randn(start, hidden_size, generator=g) * 2
    logits = torch.randn(len(rows), vocab, generator=g) * 3
    draft_ids = torch.randint(-1, vocab, (len(rows),), generator=g)  # -1: a placeholder
    return (hidden.to(dtype).to(device), torch.tensor(rows, dtype=torch.int32, device=device),
            logits.to(device), draft_ids.to(device))


def random_case(i: int, seed: int, device, small: bool):
    """Case ``i`` of a run: (its shape text, head, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    spec = pick(SPECS)
    hidden_size = pick((16, 96, 200) if small else (96, 1000, 1536, 4096))
    vocab = pick((17, 40) if small else (40, 1000))
    dtype = pick((torch.float32, torch.float32, torch.bfloat16, torch.float16))
    drafts = [int(n) for n in torch.randint(0, 6 if small else 16,
                                            (int(torch.randint(1, 5, (1,), generator=g)),),
                                            generator=g)]
    step = random_step(hidden_size, drafts, vocab, dtype, device, g)
    return f"{sum(drafts)} x {hidden_size}", random_head(spec, hidden_size, vocab, g), step


def scored(head: JudgeHead, device, path: str) -> JudgeScore:
    """A score on ``path``, its first-step check taken as passed: the check
    here is the selftest's own."""
    score = JudgeScore(head, device)
    score.path, score._checked = path, True
    return score


def disagreement(head: JudgeHead, step, path: str) -> str | None:
    """Why the score on ``path`` ("triton" or "torch") is wrong on ``step``
    (None when it agrees), or the error it raised."""
    score = scored(head, step[0].device, "torch")
    x = assemble(components(*step, names=head.features), head.features)
    scale = (x.abs() @ score.weight.abs() + score.bias.abs()).cpu()
    if path == "torch":
        ref = torch.from_numpy(head.logit_numpy(x.double().cpu().numpy())).float()
        what = "the head's own score"
    else:
        ref, what = score.logit(*step).cpu(), "the torch path"
    try:
        z = scored(head, step[0].device, path).logit(*step).cpu()
    except Exception as e:
        from fly_vllm.verify_path import error_text

        return f"raised {error_text(e)}"
    if z.dtype != torch.float32 or z.shape != ref.shape:
        return f"gave {z.dtype} {tuple(z.shape)}, not float32 {tuple(ref.shape)}"
    bad = ~((z - ref).abs() <= Z_RTOL * scale)  # NaN counts as bad
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        return (f"disagrees with {what} at {int(bad.sum())} of {z.shape[0]} drafts "
                f"(draft {t}: {float(z[t]):.6g} vs {float(ref[t]):.6g})")
    return None


def check_row(batches: int, seed: int, device, path: str, small: bool,
              failures: list[str]) -> list[str]:
    """The selftest's table row for the judge score; failures are appended."""
    bad = 0
    for i in range(batches):
        shape, head, step = random_case(i, seed, device, small)
        why = disagreement(head, step, path)
        if why is not None:
            bad += 1
            failures.append(f"judge step {i} ({shape}, {'+'.join(head.features)}): {why}")
    what = ("triton" + (" (TRITON_INTERPRET=1)" if small else "") + " vs torch score"
            if path == "triton" else "torch score vs the head's own")
    sizes = "0-20 x 16-200" if small else "0-60 x 96-4096"
    return ["judge", f"{batches} random steps: {what}", sizes,
            "ok" if not bad else f"FAILED {bad}/{batches}"]


def timing_rows(device, seed: int, bandwidth: float, time_us) -> list[list[str]]:
    """Check, then time, the h_post score at TIMING_SHAPES (bf16 states):
    Triton, the torch path, and the floor (the T rows it reads once, at the
    copy bandwidth), in microseconds; ``time_us(fn)`` is the clock."""
    rows = []
    for T, H in TIMING_SHAPES:
        g = torch.Generator().manual_seed(seed)
        head = random_head(("h_post",), H, 1000, g)
        step = random_step(H, [T], 1000, torch.bfloat16, device, g)
        why = disagreement(head, step, "triton")
        fast, ref = scored(head, device, "triton"), scored(head, device, "torch")
        floor = T * H * step[0].element_size() / bandwidth * 1e6
        times = [time_us(lambda: fast.logit(*step)) if why is None else float("nan"),
                 time_us(lambda: ref.logit(*step)), float("nan"), floor]
        rows.append(["judge", "check + timing, h_post bf16", f"{T} x {H}",
                     "ok" if why is None else f"FAILED: {why}",
                     *(f"{t:.1f}" if t == t else "" for t in times)])
    return rows

