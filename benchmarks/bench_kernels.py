"""Fused FLy (or FSD) verification vs the unfused alternative, on one GPU.

    python benchmarks/bench_kernels.py            # the full grid, on a GPU
    python benchmarks/bench_kernels.py --rule fsd # FSD's kernels, same grid
    python benchmarks/bench_kernels.py --smoke    # tiny shapes on CPU, TRITON_INTERPRET=1

Grid: batch 1/8/32/128 x K 7/15/25 x V 49152/128256 x fp32/bf16. Per row:
our fused verify (`fly_vllm.kernels.fly_verify_triton`, the whole call), the
native pre-pass (vLLM 0.33's `compute_fly_entropy` on the logits, as its
docstring allows, plus `apply_fly_greedy_acceptance_kernel`, plus the argmax
it needs), a bare `torch.argmax`, and the bandwidth floor (one read of the
logits at the GPU's peak). The native code is vLLM 0.33's
`vllm/v1/spec_decode/fly.py`, read from the unpacked wheel (`make vllm033`,
never committed); it needs only torch and triton. Times are
`triton.testing.do_bench` medians in microseconds.

Targets (issue "fused Triton verification kernels"): >= 10x faster than native
on every row; <= 1.5x a bare argmax on every row; <= 1.6x the floor where the
floor is >= 20 us. Results go to benchmarks/results/kernels-<gpu>-<date>.{md,json}.

``--rule fsd`` times ``fly_vllm.kernels.fsd_verify_triton`` (JS divergence,
greedy rows) on fp32/bf16 probability rows p and q. vLLM has no FSD, so the
comparison column is our own torch reference (``fly_vllm.fsd.fsd_verify``,
the path vLLM on CPU runs); the floor is one read of p and of q, and the
argmax column a bare ``torch.argmax`` over both. Same targets; results go to
benchmarks/results/kernels-fsd-<gpu>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / ".vllm033" / "vllm" / "v1" / "spec_decode" / "fly.py"
# Nominal peak memory bandwidth, bytes/s.
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "MI300X": 5.3e12, "MI325X": 6.0e12,
           "MI355X": 8.0e12, "A100": 2.0e12}


def load_native(path: Path):
    import triton

    if not path.exists():
        raise SystemExit(f"{path} not found: run `make vllm033` first")
    # fly.py imports `from vllm.triton_utils import tl, triton`; give it those.
    shim = types.ModuleType("vllm.triton_utils")
    shim.tl, shim.triton = triton.language, triton
    sys.modules.setdefault("vllm", types.ModuleType("vllm"))
    sys.modules["vllm.triton_utils"] = shim
    spec = importlib.util.spec_from_file_location("vllm033_native_fly", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_bw(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BW.items() if key in name), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (plumbing only)")
    ap.add_argument("--rule", choices=("fly", "fsd"), default="fly",
                    help="which verifier's kernels to time (default: fly)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    fsd = args.rule == "fsd"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    from fly_vllm.fsd import fsd_verify
    from fly_vllm.kernels import fly_verify_triton, fsd_verify_triton

    native = None if fsd else load_native(NATIVE)
    if args.smoke:
        dev, grid = "cpu", [(2, 3, 300, torch.float32), (1, 4, 257, torch.bfloat16)]
        gpu = "cpu (interpreter)"

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --smoke to check the plumbing on CPU")
        dev = "cuda"
        gpu = torch.cuda.get_device_name()
        grid = [(b, k, v, d) for d in (torch.float32, torch.bfloat16)
                for v in (49152, 128256) for k in (7, 15, 25) for b in (1, 8, 32, 128)]

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100) * 1000.0
    bw = peak_bw(gpu)
    rows = []
    for B, K, V, dtype in grid:
        g = torch.Generator(device="cpu").manual_seed(B * 1000 + K)
        logits = (torch.randn(B * K, V, generator=g) * 3).to(dtype).to(dev)
        am = logits.float().argmax(-1)
        drafts = torch.where(torch.rand(B * K, generator=g).to(dev) < 0.5, am,
                             torch.randint(0, V, (B * K,), generator=g).to(dev)).int()
        cu = (torch.arange(1, B + 1, device=dev) * K).int()
        bonus = torch.zeros(B, 1, dtype=torch.long, device=dev)
        thr = torch.full((B,), 0.3, device=dev)
        win = torch.full((B,), min(6, K - 1), dtype=torch.long, device=dev)
        if fsd:
            p = logits.float().softmax(-1).to(dtype)
            q = (logits.float() + torch.randn(B * K, V, generator=g).to(dev)).softmax(-1).to(dtype)
            read = (p, q)

            def ours():
                return fsd_verify_triton(drafts, cu, p, q, bonus, K, threshold=thr)

            def native_prepass():
                return fsd_verify(drafts, cu, p, q, bonus, K, threshold=thr)

            def argmax():
                return torch.argmax(p, dim=-1), torch.argmax(q, dim=-1)
        else:
            read = (logits,)

            def ours():
                return fly_verify_triton(drafts, cu, logits, bonus, K, entropy_threshold=thr,
                                         window=win, window_span=win, entropy_top_k=3)

            def native_prepass():
                x = logits.float()
                ent = native.compute_fly_entropy(x, 3, from_logits=True)
                target_argmax = x.argmax(-1)
                native.apply_fly_greedy_acceptance_kernel[(B,)](
                    cu, drafts, target_argmax, x, ent, None, V, 0.3,
                    FLY_WINDOW_SIZE=min(6, K - 1))
                return target_argmax

            def argmax():
                return torch.argmax(logits, dim=-1)

        t_ours, t_native, t_argmax = bench(ours), bench(native_prepass), bench(argmax)
        nbytes = sum(x.numel() * x.element_size() for x in read)
        floor = nbytes / bw * 1e6 if bw else None
        row = {"batch": B, "K": K, "vocab": V, "dtype": str(dtype).split(".")[-1],
               "ours_us": t_ours, "native_us": t_native, "argmax_us": t_argmax,
               "floor_us": floor, "vs_native": t_native / t_ours,
               "vs_argmax": t_ours / t_argmax,
               "vs_floor": t_ours / floor if floor else None}
        row["ok_native"] = row["vs_native"] >= 10
        row["ok_argmax"] = row["vs_argmax"] <= 1.5
        row["ok_floor"] = None if not floor or floor < 20 else row["vs_floor"] <= 1.6
        rows.append(row)
        print(json.dumps(row), flush=True)

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    title, other = (("Fused FSD verify (JS, greedy) vs its torch reference", "torch ref")
                    if fsd else ("Fused FLy verify vs vLLM 0.33 native pre-pass", "native"))
    flags = (" --rule fsd" if fsd else "") + (" --smoke" if args.smoke else "")
    head = [f"# {title} on {gpu}", "",
            f"- command: `python benchmarks/bench_kernels.py{flags}`",
            f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
            f"- versions: {versions}; peak bandwidth used for the floor: {bw}", "",
            f"| batch | K | vocab | dtype | ours us | {other} us | argmax us | floor us "
            f"| {other}/ours | ours/argmax | ours/floor |", "|" + "---|" * 11]
    for r in rows:
        f = lambda x, s="{:.1f}": "–" if x is None else s.format(x)  # noqa: E731
        head.append(f"| {r['batch']} | {r['K']} | {r['vocab']} | {r['dtype']} | "
                    f"{f(r['ours_us'])} | {f(r['native_us'])} | {f(r['argmax_us'])} | "
                    f"{f(r['floor_us'])} | {f(r['vs_native'])}x | {f(r['vs_argmax'], '{:.2f}')}x"
                    f" | {f(r['vs_floor'], '{:.2f}')}x |")
    text = "\n".join(head) + "\n"
    print(text)
    if not args.smoke:
        stamp = dt.date.today().isoformat()
        out = Path(args.out or ROOT / "benchmarks" / "results" /
                   f"kernels-{'fsd-' if fsd else ''}{gpu.replace(' ', '_')}-{stamp}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(
            {"gpu": gpu, "versions": versions, "rule": args.rule,
             "native_us is": other, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
