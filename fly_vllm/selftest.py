"""``fly-vllm selftest``: check this node's verifiers against the torch reference.

    fly-vllm selftest [--batches N] [--rule fly|fsd|judge|all] [--device DEV]
                      [--seed S] [--no-timing] [--interpret]

On a GPU (CUDA or ROCm): each rule's Triton verifier and its torch reference
run on N random batches (``verify_cases``: ties, -inf logits and zero
probabilities, float32, bf16 and fp16, greedy and sampled rows, per-request
thresholds, windows, margins, strict rows and prefixes, veto masks, every
divergence and variant) and must agree (``verify_path.compare``: decisions
and output rows exactly, entropy and divergence to float tolerance). Then, unless
``--no-timing``, a few engine-sized shapes B x K x V are checked and timed:
our verifier, the torch reference, a bare ``torch.argmax`` over the same
rows, and the bandwidth floor (bytes of logits, or of p and q, read once at
the device's measured copy bandwidth); medians of event-timed runs, in
microseconds.

The judge's score (``"gate": "judge"``; judge/kernel_check.py): its Triton
pass against its torch path on N random heads and steps, then timed at two
T x H shapes, on a GPU; on the CPU, the torch path against the head's own
unfolded score.

On the CPU: the torch path only, as the plugin runs it there. The reference
runs on the random batches and its output must keep the rule's invariants
(vLLM's row layout, strict rows and prefixes exact, nothing loosely accepted
that is native, vetoed, a placeholder or impossible under the target); the
Triton kernels are not checked, and the output says so. ``--interpret`` runs
them under ``TRITON_INTERPRET=1`` on small shapes instead (slow).

``FLY_VLLM_VERIFIER=module:function`` (verify_path.py) checks that verifier
instead of the Triton one, on any device.

Prints one table; exits 0 when everything agrees, 1 on any disagreement,
error or broken invariant, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

COPY_BYTES = 256 * 2 ** 20
TIMING_SHAPES = ((1, 4, 128256), (32, 4, 128256), (64, 8, 151936))
REPS = 20
SHOWN_FAILURES = 10


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fly-vllm selftest", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=300, help="random batches per rule")
    ap.add_argument("--rule", choices=("fly", "fsd", "judge", "all"), default="all")
    ap.add_argument("--device", help="default: cuda if torch sees a GPU, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timing", action="store_true", help="skip the timing rows")
    ap.add_argument("--interpret", action="store_true",
                    help="on the CPU, check the Triton kernels under TRITON_INTERPRET=1 "
                         "on small shapes")
    return ap.parse_args(argv)


def random_batch(rule: str, i: int, seed: int, device, small: bool):
    """Batch ``i`` of the run: (its shape, the reference's arguments)."""
    import torch

    from fly_vllm.fsd import DIVERGENCES, VARIANTS
    from fly_vllm.verify_cases import CaseShape, make_case

    g = torch.Generator().manual_seed(seed * 1_000_003 + i)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def coin(p: float = 0.5) -> bool:
        return bool(torch.rand(1, generator=g) < p)

    shape = CaseShape(
        batch=int(torch.randint(1, 5 if small else 9, (1,), generator=g)),
        spec_len=pick((1, 2, 3, 5) if small else (1, 2, 3, 4, 5, 7, 8, 15)),
        vocab=pick((17, 37, 64) if small else (37, 1000, 5003, 32000)),
        sampled=coin(), veto=coin(), margin=coin(), ties=coin(0.25),
        dtype=pick((torch.float32,) * 3 + (torch.bfloat16,) * 2 + (torch.float16,)),
    )
    return shape, make_case(rule, g, shape, device, top_k=int(torch.randint(1, 9, (1,),
                                                                              generator=g)),
                            kind=pick(DIVERGENCES), variant=pick(VARIANTS))


def invariants(rule: str, args: dict, out) -> list[str]:
    """What any correct verification of ``args`` satisfies, broken by
    ``out`` (a FlyVerifyOutput); empty when it keeps them all."""
    import torch

    broken = []
    drafts = args["draft_token_ids"].long().cpu()
    cu = args["cu_num_draft_tokens"].long().cpu()
    n = torch.diff(cu, prepend=cu.new_zeros(1))
    rows, acc = out.output_token_ids.long().cpu(), out.num_accepted.cpu()
    bonus = args["bonus_token_ids"].reshape(-1).long().cpu()
    for b in range(n.shape[0]):
        start, nb, a, row = int(cu[b] - n[b]), int(n[b]), int(acc[b]), rows[b]
        if not 0 <= a <= nb:
            broken.append(f"request {b}: {a} accepted of {nb} drafts")
            continue
        if not torch.equal(row[:a], drafts[start:start + a]):
            broken.append(f"request {b}: the accepted prefix is not the drafts")
        if row[a] < 0 or (a == nb and row[a] != bonus[b]):
            broken.append(f"request {b}: no correction or bonus token after the prefix")
        if (row[a + 1:] != -1).any():
            broken.append(f"request {b}: tokens after the correction")
    req = torch.repeat_interleave(torch.arange(n.shape[0]), n)
    if not torch.equal(torch.zeros_like(acc).scatter_add_(0, req, out.in_prefix.long().cpu()),
                       acc):
        broken.append("in_prefix does not add up to num_accepted")
    loose = out.loose_accepted.cpu()
    scores = (args["target_logits"] if rule == "fly" else args["target_probs"]).float().cpu()
    vocab = scores.shape[-1]
    score = scores.gather(-1, drafts.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    strict = (~torch.isfinite(args["entropy_threshold"].cpu()) if rule == "fly"
              else args["exact"].cpu())
    forbidden = {
        "native": out.native.cpu(),
        "a placeholder": (drafts < 0) | (drafts >= vocab),
        "impossible under the target": score == (float("-inf") if rule == "fly" else 0.0),
        "in a strict row": strict[req],
        "vetoed": args["veto"].cpu() if "veto" in args else torch.zeros_like(loose),
        "inside a strict prefix": (out.positions.cpu() < args["loose_from"].cpu()[req]
                                   if "loose_from" in args else torch.zeros_like(loose)),
    }
    broken += [f"a draft {what} was accepted loosely" for what, mask in forbidden.items()
               if (loose & mask).any()]
    return broken


def gpu_time_us(fn: Callable[[], object], reps: int = REPS) -> float:
    """Median of ``reps`` runs of ``fn`` in microseconds, timed with device
    events (torch.cuda, which is HIP under ROCm)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """The device's copy bandwidth in bytes/s (each byte read and written)."""
    import torch

    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = gpu_time_us(lambda: dst.copy_(src)) * 1e-6
    return 2 * src.nbytes / seconds


def timing_rows(rule: str, fn, device, seed: int, bandwidth: float) -> list[list[str]]:
    """Check and time ``fn`` at TIMING_SHAPES (greedy rows, float32)."""
    import torch

    from fly_vllm.verify_cases import CaseShape, make_case
    from fly_vllm.verify_path import REFERENCES, disagreement

    reference, rows = REFERENCES[rule], []
    for B, K, V in TIMING_SHAPES:
        g = torch.Generator(device).manual_seed(seed)
        args = make_case(rule, g, CaseShape(B, K, V, full=True), device)
        why = disagreement(fn, args, reference(**args))
        read = [args["target_logits"]] if rule == "fly" else [args["target_probs"],
                                                              args["draft_probs"]]
        floor = sum(t.nbytes for t in read) / bandwidth * 1e6
        times = [gpu_time_us(lambda: fn(**args)) if why is None else float("nan"),
                 gpu_time_us(lambda: reference(**args)),
                 gpu_time_us(lambda: torch.argmax(read[0], dim=-1)), floor]
        rows.append([rule, "check + timing, greedy float32", f"{B}x{K}x{V}",
                     "ok" if why is None else f"FAILED: {why}",
                     *(f"{t:.1f}" for t in times)])
        del args, read
    return rows


def check_rule(rule: str, opts, device, fn, label: str, failures: list[str]) -> list[str]:
    """The batches' table row for ``rule``; failures are appended."""
    from fly_vllm.verify_path import REFERENCES, disagreement

    small = opts.interpret
    bad = 0
    for i in range(opts.batches):
        shape, args = random_batch(rule, i, opts.seed, device, small)
        ref = REFERENCES[rule](**args)
        why = "; ".join(invariants(rule, args, ref)) or None
        if why is not None:
            why = f"the torch reference broke an invariant: {why}"
        elif fn is not None:
            why = disagreement(fn, args, ref)
        if why is not None:
            bad += 1
            failures.append(f"{rule} batch {i} ({shape}): {why}")
    sizes = "1-4 x 1-5 x 17-64" if small else "1-8 x 1-15 x 37-32000"
    what = f"{opts.batches} random batches: " + (
        f"{label} vs torch reference" if fn is not None else "torch reference invariants")
    return [rule, what, sizes, "ok" if not bad else f"FAILED {bad}/{opts.batches}"]


def judge_rows(opts, device, timed: bool, bandwidth: float, failures: list[str],
               checked: list[str]) -> list[list[str]]:
    """The judge score's rows: Triton against torch where the plugin would
    run the kernel (or under --interpret), else torch against the head."""
    from fly_vllm.judge import kernel_check
    from fly_vllm.judge.score import score_path

    path = "triton" if opts.interpret else score_path(device)
    if path == "triton":
        try:
            import fly_vllm.kernels.judge_score  # noqa: F401
        except Exception as e:
            from fly_vllm.verify_path import error_text

            failures.append(f"judge: could not load the Triton score: {error_text(e)}")
            return [["judge", "load the Triton score", "", "FAILED"]]
        checked.append("the judge's triton score"
                       + (" (TRITON_INTERPRET=1)" if opts.interpret else ""))
    rows = [kernel_check.check_row(opts.batches, opts.seed, device, path, opts.interpret,
                                   failures)]
    if timed and path == "triton":
        timing = kernel_check.timing_rows(device, opts.seed, bandwidth, gpu_time_us)
        failures += [f"judge {r[2]}: {r[3]}" for r in timing if r[3] != "ok"]
        rows += timing
    return rows


def table(rows: list[list[str]], timed: bool) -> str:
    head = ["rule", "check", "B x K x V (judge: T x H)", "result"]
    if timed:
        head += ["ours us", "torch ref us", "torch.argmax us", "floor us"]
    lines = [head, ["---"] * len(head)] + [r + [""] * (len(head) - len(r)) for r in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    if opts.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before fly_vllm.kernels is imported
    import torch

    from fly_vllm import verify_path

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"fly-vllm selftest: device {device} asked for, but torch sees no GPU",
              file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    rules = ("fly", "fsd", "judge") if opts.rule == "all" else (opts.rule,)
    try:
        import triton
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no triton"
    timed = gpu and not opts.no_timing
    bandwidth = copy_bandwidth(device) if timed else 0.0
    print(f"fly-vllm selftest: device {verify_path.device_text(device)}, {versions}"
          + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s" if timed else ""))
    rows, failures, checked = [], [], []
    for rule in rules:
        if rule == "judge":
            rows += judge_rows(opts, device, timed, bandwidth, failures, checked)
            continue
        cand = verify_path.candidate(device, rule)
        if cand is None and opts.interpret:
            cand = verify_path.triton_candidate(rule)
        fn, label = None, None
        if cand is not None:
            label = cand.name + (" (TRITON_INTERPRET=1)" if opts.interpret else "")
            try:
                fn = cand.load()
            except Exception as e:
                failures.append(f"{rule}: could not load {label}: "
                                f"{verify_path.error_text(e)}")
                rows.append([rule, f"load {label}", "", "FAILED"])
                continue
            checked.append(label)
        rows.append(check_rule(rule, opts, device, fn, label, failures))
        if timed and fn is not None:
            timing = timing_rows(rule, fn, device, opts.seed, bandwidth)
            rows += timing
            failures += [f"{r[0]} {r[2]}: {r[3]}" for r in timing if r[3] != "ok"]
    where = "No GPU found" if not torch.cuda.is_available() else f"Device {device} chosen"
    if not gpu and not checked:
        print(f"{where}: the Triton kernels were not checked (--interpret runs them under "
              "the Triton interpreter). On the CPU the plugin verifies with the torch "
              "path, checked here against its invariants.")
    elif not gpu:
        print(f"{where}: checked {', '.join(sorted(set(checked)))} on the CPU.")
    print(table(rows, timed))
    for line in failures[:SHOWN_FAILURES]:
        print("FAIL", line)
    if len(failures) > SHOWN_FAILURES:
        print(f"... and {len(failures) - SHOWN_FAILURES} more")
    if failures:
        print("fly-vllm selftest: FAILED. The engine checks its verifier at start-up and "
              "verifies with the torch path where it fails (same results, slower); a "
              "failure here means a verifier is wrong on this node: please report this "
              "output.")
        return 1
    print("fly-vllm selftest: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
