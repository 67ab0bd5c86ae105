"""Scoring: GSM8K final answers, HumanEval programs in a sandbox, agreement
with the target's own output, and intervals.

HumanEval programs run in a separate Python process (`-I`, isolated), in an
empty temporary folder, with a time limit, an address-space limit, and, where
`unshare` can make one (root on Linux), a network namespace with no network.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_extract(text: str) -> str | None:
    """The model's final number: after the last '####' if present, else the
    last number in the text. Commas dropped; '12.0' -> '12'."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    nums = _NUM.findall(tail) or _NUM.findall(text)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", n):
        n = n.split(".")[0]
    return n


def gsm8k_correct(text: str, reference: str) -> bool:
    got = gsm8k_extract(text)
    return got is not None and got == reference.replace(",", "")


def humaneval_program(problem: dict, completion: str) -> str:
    """The program to test: the model's code block if it defines the entry
    point, else the prompt followed by the completion."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", completion, re.S)
    code = blocks[0] if blocks else completion
    if f"def {problem['entry_point']}" not in code:
        code = problem["prompt"] + code
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))


def run_sandboxed(program: str, timeout: float = 10.0) -> bool:
    """True iff the program exits 0 within the time limit."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "program.py")
        with open(path, "w", encoding="utf-8", errors="replace") as f:
            f.write(program.replace("\x00", ""))
        cmd = [sys.executable, "-I", path]
        if shutil.which("unshare") and os.geteuid() == 0:
            cmd = ["unshare", "--net", "--"] + cmd
        try:
            r = subprocess.run(cmd, cwd=d, capture_output=True, timeout=timeout,
                               preexec_fn=_limit_resources, env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def humaneval_passes(problem: dict, completion: str) -> bool:
    return run_sandboxed(humaneval_program(problem, completion))


def lcs_ratio(a: Sequence[int], b: Sequence[int]) -> float:
    """Longest common subsequence of two token lists over the longer length:
    1.0 for identical outputs."""
    if not a and not b:
        return 1.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(k)) / k for _ in range(n_boot))
    return means[int(alpha / 2 * n_boot)], means[int((1 - alpha / 2) * n_boot) - 1]


def ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = 2000,
             seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Paired bootstrap interval of mean(num) / mean(den) over the same items."""
    rng = random.Random(seed)
    k = len(num)
    if k == 0:
        return (float("nan"), float("nan"))
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(k) for _ in range(k)]
        d = sum(den[i] for i in idx)
        if d > 0:
            ratios.append(sum(num[i] for i in idx) / d)
    ratios.sort()
    if not ratios:
        return (float("nan"), float("nan"))
    return ratios[int(alpha / 2 * len(ratios))], ratios[int((1 - alpha / 2) * len(ratios)) - 1]


def binom_bound(k: int, n: int, alpha: float, upper: bool = False) -> float:
    """One-sided exact (Clopper-Pearson) confidence bound of a proportion
    k / n at level 1 - alpha: the lower bound is the p with
    P[Bin(n, p) >= k] = alpha (0 for k = 0), the upper the p with
    P[Bin(n, p) <= k] = alpha (1 for k = n). The lower bound is the alpha
    quantile of Beta(k, n - k + 1) (scipy, imported here: the plugin runs
    without it)."""
    if n <= 0:
        return float("nan")
    if upper:
        return 1.0 - binom_bound(n - k, n, alpha)
    if k <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(alpha, k, n - k + 1))


def exact_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) 1 - alpha interval of k / n."""
    return binom_bound(k, n, alpha / 2), binom_bound(k, n, alpha / 2, upper=True)


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: scipy's binomial test of the
    discordant pairs against an even split (1.0 when there are none)."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(right_to_wrong, wrong_to_right), n, 0.5).pvalue)


def aligned(mode: dict[str, float], base: dict[str, float]) -> tuple[list, list]:
    """Per-item scores (item id -> score) of two runs on the items both
    scored, as two lists in the same item order."""
    ids = [i for i in base if i in mode]
    return [mode[i] for i in ids], [base[i] for i in ids]


def paired(mode: dict[str, float], base: dict[str, float]) -> dict:
    """Paired comparison of per-item correctness (item id -> 0/1) on the
    items both runs scored: flips each way and McNemar's exact p."""
    mine, theirs = aligned(mode, base)
    r2w = sum(1 for x, y in zip(mine, theirs) if y and not x)
    w2r = sum(1 for x, y in zip(mine, theirs) if x and not y)
    return {"n": len(mine), "right_to_wrong": r2w, "wrong_to_right": w2r,
            "mcnemar_p": mcnemar_exact(r2w, w2r)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token; None if one is a prefix of the other
    (the same text cut at another length)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def classify_divergence(top: list[tuple[int, float]], ours: int, theirs: int,
                        tie_nats: float) -> dict:
    """Why two greedy outputs part. `top`: the target's (token, logprob),
    best first, at the parting token; `ours`: the target-alone run's token;
    `theirs`: the other run's. A near-tie: the two are the target's top two
    and within `tie_nats` of each other."""
    ranks = {t: i for i, (t, _) in enumerate(top)}
    lp = dict(top)
    out = {"rank_target_token": ranks.get(ours), "rank_mode_token": ranks.get(theirs)}
    if ours in lp and theirs in lp:
        out["gap_nats"] = abs(lp[ours] - lp[theirs])
    out["near_tie"] = (set(ranks.get(t) for t in (ours, theirs)) == {0, 1}
                       and out.get("gap_nats", 1e9) <= tie_nats)
    return out
