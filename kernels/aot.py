"""Ahead-of-time compilation of the verification and judge kernels for real GPU targets,
on any machine: no GPU and no driver are needed (the triton wheel carries
ptxas and the AMD code generator).

The interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python, and accepts
code that the compiler rejects. This module compiles every kernel, at the
constexpr settings and launch options its wrapper uses (``*_launch`` in
fly_verify.py, fsd_verify.py and judge_score.py), to a cubin for ``sm_90a`` (H100) and an
hsaco for ``gfx942`` (MI300X) and ``gfx950`` (MI355X), and reads what each
binary says about its resources:

    registers   sm_90a: registers per thread (cuobjdump); AMD: VGPRs per lane
    spills      sm_90a: local memory and stack bytes; AMD: VGPR and SGPR
                spill counts
    scratch     AMD: private segment bytes
    shared      shared memory / LDS bytes per program (static + Triton's)
    occupancy   sm_90a: warps resident per SM out of 64 (registers, shared
                memory, warp and block limits of an H100); AMD: waves per SIMD
                out of 8, as the AMD compiler reports it
    loops       loops whose trip count is known only at run time (from the
                kernel's TTGIR; see common.py for why there are none)

``check`` holds each kernel to a budget per target (``BUDGETS``): no spills,
no scratch, and the occupancy the kernel was designed for.

    python -m fly_vllm.kernels.aot [--targets sm_90a,gfx942,gfx950] [--quick]

prints one table and exits 1 if a kernel fails to compile or is over budget.
Run it in a process without ``TRITON_INTERPRET`` (the kernels must be real
``@triton.jit`` functions) and with ``TRITON_CACHE_DIR`` pointing at an empty
folder, or a cached binary answers instead of the compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fly_vllm.kernels import fly_verify, fsd_verify, judge_score

TARGETS = {
    "sm_90a": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}
# The settings users run: K (num_speculative_tokens), logits dtypes, and
# vocabularies (Llama-2, SmolLM2, Llama-3, Qwen2.5, and one not divisible by 16).
SPEC_LENS = (2, 4, 8, 15, 25)
DTYPES = ("fp32", "bf16", "fp16")
VOCABS = (32000, 49152, 128256, 151936, 50257)
TOP_KS = tuple(range(1, 9))
# The judge's hidden sizes: SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B, Qwen2.5-7B,
# Llama-3-8B, Llama-3-70B, and one not divisible by 16; and its feature specs
# (which hidden rows it reads), each with and without scalar features.
HIDDENS = (576, 896, 1536, 3584, 4096, 8192, 1000)
JUDGE_SPECS = {"h_post": (True, False), "h_pre": (False, True),
               "h_post+h_pre": (True, True)}

# sm_90 (H100) limits for the occupancy figure.
SM90 = dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=228 * 1024,
            smem_reserved=1024)


@dataclass(frozen=True)
class Budget:
    """Per kernel and backend: the fewest warps per SM (sm_90a, of 64) or
    waves per SIMD (AMD, of 8), and the most shared memory / LDS bytes."""

    min_occupancy: int
    max_shared: int


# Row kernels stream [T, V] once, one program of 8 warps per row: their
# bandwidth needs loads in flight, so they keep at least 2 programs (16
# warps) per H100 SM and 4 waves per AMD SIMD. Each thread loads BLOCK_V /
# 256 = 16 (sm_90a) or BLOCK_V / 512 = 8 (AMD) values per block, so that is
# at least 32 KiB of loads in flight per SM or CU. Accept kernels run one
# program of 4 warps per request, B programs in all: occupancy does not limit
# them, but a spill would put local memory on the step's critical path.
#
# The judge kernel reads one or two hidden rows (H values) per draft, one
# program of 4 warps each, T programs a step: a small launch whose time is
# the latency of those loads, so it keeps at least 4 programs (16 warps) per
# H100 SM and 4 waves per AMD SIMD to overlap them; its cross-warp sum needs
# a few bytes of shared memory only.
BUDGETS = {
    ("row", "cuda"): Budget(min_occupancy=16, max_shared=16 * 1024),
    ("row", "hip"): Budget(min_occupancy=4, max_shared=16 * 1024),
    ("judge", "cuda"): Budget(min_occupancy=16, max_shared=4 * 1024),
    ("judge", "hip"): Budget(min_occupancy=4, max_shared=4 * 1024),
    ("accept", "cuda"): Budget(min_occupancy=4, max_shared=32 * 1024),
    ("accept", "hip"): Budget(min_occupancy=1, max_shared=32 * 1024),
}


@dataclass
class Case:
    """One kernel specialisation: the kernel, its argument types in order
    (``*fp32`` pointers, ``i32`` scalars, ``constexpr``), constexpr values and
    launch options, as the wrapper would launch it."""

    fn: object  # the @triton.jit function
    kind: str  # "row", "accept" or "judge"
    label: str
    args: list[tuple[str, str]]
    constexprs: dict
    options: dict
    divisible: set[str] = field(default_factory=set)  # int args divisible by 16

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def source(self, target: GPUTarget) -> ASTSource:
        fn = self.fn
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{self.kernel} is not a compiled @triton.jit function "
                               "(TRITON_INTERPRET is set?): run without it")
        signature = dict(self.args)
        signature.update({k: "constexpr" for k in self.constexprs})
        names = list(fn.arg_names)
        attrs = {}
        for name, ty in signature.items():
            spec = []
            if ty.startswith("*") or name in self.divisible:
                # Torch allocations are 16-byte aligned; Triton's launcher
                # specialises on it as on ints divisible by 16.
                spec.append(["tt.divisibility", 16])
            if ty.startswith("*") and target.backend == "hip":
                spec.append(["tt.pointer_range", 32])  # buffer ops: tensors < 2 GiB
            if spec:
                attrs[(names.index(name),)] = spec
        return ASTSource(fn, signature, self.constexprs, attrs)


def _row_stats(dtype: str, vocab: int, top_k: int, backend: str) -> Case:
    constexprs, options = fly_verify.row_stats_launch(vocab, top_k, backend=backend)
    args = [("logits_ptr", f"*{dtype}"), ("stride_row", "i32"), ("draft_ptr", "*i32"),
            ("lse_ptr", "*fp32"), ("argmax_ptr", "*i64"), ("entropy_ptr", "*fp32"),
            ("draft_logit_ptr", "*fp32"), ("margin_ptr", "*fp32")]
    return Case(fly_verify._row_stats_kernel, "row", f"{dtype} V={vocab} top_k={top_k}", args,
                constexprs, options, {"stride_row"} if vocab % 16 == 0 else set())


def _fsd_row(dtype: str, vocab: int, kind: str, backend: str) -> Case:
    constexprs, options = fsd_verify.fsd_row_launch(vocab, kind, backend=backend)
    args = [("p_ptr", f"*{dtype}"), ("stride_p", "i32"), ("q_ptr", f"*{dtype}"),
            ("stride_q", "i32"), ("draft_ptr", "*i32"), ("div_ptr", "*fp32"),
            ("argmax_ptr", "*i64"), ("pd_ptr", "*fp32"), ("qd_ptr", "*fp32")]
    return Case(fsd_verify._fsd_row_kernel, "row", f"{dtype} V={vocab} {kind}", args, constexprs,
                options, {"stride_p", "stride_q"} if vocab % 16 == 0 else set())


def _judge(dtype: str, hidden_size: int, spec: str, has_s: bool, backend: str,
           rows: str = "i32") -> Case:
    """The judge's kernel as JudgeScore (fly_vllm.judge.score) launches it: ``rows`` is vLLM's
    target_logits_indices (int32); the weights are fp32 allocations of
    their own; the scalar part, absent, is replaced by the output."""
    has_post, has_pre = JUDGE_SPECS[spec]
    constexprs, options = judge_score.judge_score_launch(hidden_size, has_post, has_pre,
                                                         has_s, backend=backend)
    args = [("hidden_ptr", f"*{dtype}"), ("stride_row", "i32"), ("rows_ptr", f"*{rows}"),
            ("w_post_ptr", "*fp32"), ("w_pre_ptr", "*fp32"), ("s_ptr", "*fp32"),
            ("z_ptr", "*fp32"), ("bias", "fp32")]
    label = f"{dtype} H={hidden_size} {spec}{' +scalars' if has_s else ''}"
    label += "" if rows == "i32" else f" rows={rows}"
    return Case(judge_score._judge_score_kernel, "judge", label, args, constexprs, options,
                {"stride_row"} if hidden_size % 16 == 0 else set())


# The accept kernels' arguments as fly_verify_triton / fsd_verify_triton pass
# them, in vLLM's dtypes (its rejection sampler's warm-up: int32 drafts and
# cumsum, int64 bonus tokens, float64 uniforms; recovered tokens int32 like
# the drafts). Without HAS_RANDOM / HAS_VETO the wrappers pass placeholders of
# other types, as here.
def _accept(spec_len: int, has_random: bool, has_veto: bool, vocab: int, backend: str
            ) -> Case:
    constexprs, options = fly_verify.accept_launch(spec_len, has_random, has_veto,
                                                   backend=backend)
    r = has_random
    args = [("out_ptr", "*i32"), ("num_accepted_ptr", "*i64"), ("flags_ptr", "*i32"),
            ("cu_ptr", "*i32"), ("draft_ptr", "*i32"), ("argmax_ptr", "*i64"),
            ("entropy_ptr", "*fp32"), ("draft_logit_ptr", "*fp32"), ("margin_ptr", "*fp32"),
            ("bonus_ptr", "*i64"), ("thr_ptr", "*fp32"), ("max_margin_ptr", "*fp32"),
            ("loose_from_ptr", "*i64"), ("window_ptr", "*i64"), ("span_ptr", "*i64"),
            ("is_greedy_ptr", "*i1" if r else "*i32"), ("p_ptr", "*fp32"),
            ("q_ptr", "*fp32"), ("u_ptr", "*fp64" if r else "*fp32"),
            ("recovered_ptr", "*i32" if r else "*i64"),
            ("veto_ptr", "*i1" if has_veto else "*i32"), ("V", "i32"), ("S", "i32")]
    label = f"K={spec_len} {'random' if r else 'greedy'}{' veto' if has_veto else ''}"
    return Case(fly_verify._accept_kernel, "accept", label, args, constexprs, options,
                {"V"} if vocab % 16 == 0 else set())


def _fsd_accept(spec_len: int, fallback: bool, has_random: bool, has_veto: bool,
                vocab: int, backend: str) -> Case:
    constexprs, options = fsd_verify.fsd_accept_launch(spec_len, fallback, has_random,
                                                       has_veto, backend=backend)
    r = has_random
    args = [("out_ptr", "*i32"), ("num_accepted_ptr", "*i64"), ("flags_ptr", "*i32"),
            ("cu_ptr", "*i32"), ("draft_ptr", "*i32"), ("argmax_ptr", "*i64"),
            ("div_ptr", "*fp32"), ("pd_ptr", "*fp32"), ("qd_ptr", "*fp32"),
            ("bonus_ptr", "*i64"), ("thr_ptr", "*fp32"), ("exact_ptr", "*i1"),
            ("loose_from_ptr", "*i64"), ("is_greedy_ptr", "*i1"),
            ("u_ptr", "*fp64" if r else "*fp32"), ("recovered_ptr", "*i32" if r else "*i64"),
            ("resampled_ptr", "*i64"), ("veto_ptr", "*i1"), ("V", "i32"), ("S", "i32")]
    label = (f"K={spec_len} {'fallback' if fallback else 'resample'} "
             f"{'random' if r else 'greedy'}{' veto' if has_veto else ''}")
    return Case(fsd_verify._fsd_accept_kernel, "accept", label, args, constexprs, options,
                {"V"} if vocab % 16 == 0 else set())


def cases(backend: str, quick: bool = False) -> list[Case]:
    """Every specialisation the wrappers launch, for ``backend``: each
    setting crossed with the others where they interact (dtype x vocabulary
    for the row kernels, the variant flags for the accept kernels), and
    swept alone where they do not (top-k, divergence kind, K). ``quick``
    keeps one point of each sweep."""
    vocabs = VOCABS[-2:] if quick else VOCABS
    lens = (8,) if quick else SPEC_LENS
    out = []
    for dtype in DTYPES:
        for vocab in vocabs:
            out.append(_row_stats(dtype, vocab, 3, backend))
            out.append(_fsd_row(dtype, vocab, "js", backend))
    for top_k in (1, 8) if quick else TOP_KS:
        if top_k != 3:
            out.append(_row_stats("bf16", 128256, top_k, backend))
    for kind in fsd_verify.DIVERGENCES:
        if kind != "js":
            out.append(_fsd_row("fp32", 151936, kind, backend))
    for k in lens:
        for has_random in (False, True):
            for has_veto in (False, True):
                out.append(_accept(k, has_random, has_veto, 151936, backend))
                for fallback in (False, True):
                    if k == 8 or (not fallback and has_veto):
                        out.append(_fsd_accept(k, fallback, has_random, has_veto, 151936,
                                               backend))
    out.append(_accept(8, True, True, 50257, backend))
    out.append(_fsd_accept(8, False, True, True, 50257, backend))
    # The judge: dtype x hidden size at the default spec (h_post, no
    # scalars); every spec with and without scalars at one size; int64 rows.
    for dtype in DTYPES:
        for hidden_size in HIDDENS[-2:] if quick else HIDDENS:
            out.append(_judge(dtype, hidden_size, "h_post", False, backend))
    for spec in JUDGE_SPECS:
        for has_s in (False, True):
            if spec != "h_post" or has_s:
                out.append(_judge("bf16", 4096, spec, has_s, backend))
    out.append(_judge("bf16", 4096, "h_post", False, backend, rows="i64"))
    return out


@dataclass
class Resources:
    """What one compiled binary says (see the module docstring)."""

    target: str
    kernel: str
    kind: str
    label: str
    num_warps: int
    num_stages: int
    registers: int
    spills: int
    scratch: int
    shared: int
    occupancy: int
    runtime_loops: int = 0
    error: str | None = None


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the triton wheel")
    return str(path)


def _sm90_occupancy(regs: int, shared: int, warps: int) -> int:
    """Warps resident per H100 SM, from registers, shared memory and limits."""
    per_warp = -(-max(regs, 1) * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    blocks = min(SM90["blocks"], SM90["warps"] // warps,
                 SM90["regs"] // (per_warp * warps),
                 SM90["smem"] // (shared + SM90["smem_reserved"]))
    return blocks * warps


def _cuda_resources(kernel, case: Case) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    m = re.search(r"Function \S+:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    regs, stack, static_shared, local = map(int, m.groups())
    shared = static_shared + kernel.metadata.shared
    return dict(registers=regs, spills=stack + local, scratch=local, shared=shared,
                occupancy=_sm90_occupancy(regs, shared, case.options["num_warps"]))


def _amd_field(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"no {pattern!r} in the AMD assembly")
    return int(m.group(1))


def _hip_resources(kernel, case: Case) -> dict:
    asm = kernel.asm["amdgcn"]
    spills = (_amd_field(asm, r"\.vgpr_spill_count:\s+(\d+)")
              + _amd_field(asm, r"\.sgpr_spill_count:\s+(\d+)"))
    return dict(registers=_amd_field(asm, r"; TotalNumVgprs:\s+(\d+)"), spills=spills,
                scratch=_amd_field(asm, r"\.private_segment_fixed_size:\s+(\d+)"),
                shared=_amd_field(asm, r"\.group_segment_fixed_size:\s+(\d+)")
                + kernel.metadata.shared,
                occupancy=_amd_field(asm, r"; Occupancy:\s+(\d+)"))


def runtime_loops(ttgir: str) -> int:
    """How many ``scf.for`` loops in a TTGIR module have a bound that is not
    an ``arith.constant``."""
    constants = set(re.findall(r"(%[\w.]+) = arith\.constant", ttgir))
    loops = re.findall(r"scf\.for %[\w.]+ = (%[\w.]+) to (%[\w.]+) step (%[\w.]+)", ttgir)
    return sum(1 for bounds in loops if not set(bounds) <= constants)


def compile_case(case: Case, target_name: str) -> Resources:
    """Compile one case for one target; a compile error is returned in
    ``error``, not raised."""
    target = TARGETS[target_name]
    res = Resources(target_name, case.kernel, case.kind, case.label,
                    case.options["num_warps"], case.options.get("num_stages", 0),
                    0, 0, 0, 0, 0)
    try:
        kernel = triton.compile(case.source(target), target=target, options=case.options)
        found = (_cuda_resources if target.backend == "cuda" else _hip_resources)(kernel, case)
    except Exception as e:  # noqa: BLE001 - reported per case
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        return res
    res.num_stages = kernel.metadata.num_stages
    res.runtime_loops = runtime_loops(kernel.asm["ttgir"])
    for k, v in found.items():
        setattr(res, k, v)
    return res


def check(res: Resources) -> list[str]:
    """What is wrong with one compiled kernel (empty if nothing)."""
    if res.error:
        return [f"does not compile: {res.error}"]
    backend = TARGETS[res.target].backend
    budget = BUDGETS[(res.kind, backend)]
    problems = []
    if res.spills:
        problems.append(f"spills ({res.spills})")
    if res.scratch:
        problems.append(f"uses scratch / local memory ({res.scratch} bytes)")
    if res.shared > budget.max_shared:
        problems.append(f"shared memory {res.shared} > {budget.max_shared} bytes")
    if res.occupancy < budget.min_occupancy:
        unit = "warps per SM" if backend == "cuda" else "waves per SIMD"
        problems.append(f"occupancy {res.occupancy} < {budget.min_occupancy} {unit}")
    if res.runtime_loops:
        problems.append(f"{res.runtime_loops} loop(s) with a runtime trip count")
    if backend == "hip" and res.num_stages != 1:
        problems.append(f"num_stages {res.num_stages} on AMD (the pipeliner is avoided)")
    return problems


def compile_all(targets: list[str], quick: bool = False, progress=None) -> list[Resources]:
    out = []
    for name in targets:
        todo = cases(TARGETS[name].backend, quick)
        for i, case in enumerate(todo):
            out.append(compile_case(case, name))
            if progress:
                progress(f"{name}: {i + 1}/{len(todo)} {case.kernel} {case.label}")
    return out


def table(results: list[Resources]) -> str:
    """One markdown row per kernel and target: the worst case of each column
    over that kernel's specialisations."""
    lines = ["| kernel | target | cases | warps | stages | registers (max) | spills | "
             "scratch | shared / LDS bytes (max) | occupancy (min) | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[Resources]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.target), []).append(r)
    for (kernel, target), rs in groups.items():
        ok = [r for r in rs if not r.error]
        unit = "warps/SM of 64" if TARGETS[target].backend == "cuda" else "waves/SIMD of 8"
        bad = sum(1 for r in rs if check(r))
        stat = lambda f, agg: str(agg(getattr(r, f) for r in ok)) if ok else "-"  # noqa: E731
        lines.append(
            f"| {kernel} | {target} | {len(rs)} | {stat('num_warps', max)} | "
            f"{stat('num_stages', max)} | {stat('registers', max)} | {stat('spills', max)} | "
            f"{stat('scratch', max)} | {stat('shared', max)} | "
            f"{stat('occupancy', min)} {unit} | {bad or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fly_vllm.kernels.aot",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated, from {', '.join(TARGETS)}")
    ap.add_argument("--quick", action="store_true", help="one point of each sweep")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--json", metavar="FILE", help="also write every case's figures here")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it")
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    results = compile_all(targets, args.quick, progress)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    failed = [(r, p) for r in results for p in [check(r)] if p]
    for r, problems in failed:
        print(f"FAIL {r.kernel} [{r.label}] on {r.target}: {'; '.join(problems)}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
