"""Three broken verifiers, one per way an accelerated verifier can fail, for
``FLY_VLLM_VERIFIER=tests.faulty_verifiers:<name>`` (verify_path.py).

Each takes either rule's arguments. The kernels below are built with
``JITFunction`` directly, not ``@triton.jit``, so that they stay real
(compiled) kernels even in a process where TRITON_INTERPRET=1 turns every
``@triton.jit`` into the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fly_vllm.fsd import fsd_verify
from fly_vllm.verifier import fly_verify

SCALE = 4  # a plain global: Triton refuses to read it inside a kernel


def _reads_a_global(out_ptr):
    tl.store(out_ptr, SCALE)


def _stores_one(out_ptr, value):
    tl.store(out_ptr, value)


reads_a_global = JITFunction(_reads_a_global)
stores_one = JITFunction(_stores_one)


def reference(*args, **kwargs):
    """The torch reference of the rule these arguments are for."""
    return (fsd_verify if "threshold" in kwargs else fly_verify)(*args, **kwargs)


def compile_error(*args, **kwargs):
    """Compiles a kernel for an H100 (sm_90): Triton's front end raises a
    real CompilationError (a global read), on any machine."""
    src = triton.compiler.ASTSource(fn=reads_a_global, signature={"out_ptr": "*i32"},
                                    constexprs={})
    triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", 90, 32))
    raise AssertionError("the kernel compiled")  # not reached


def launch_error(*args, **kwargs):
    """Launches a compiled kernel on a CPU tensor: with no GPU, Triton finds
    no active driver (RuntimeError); with one, it refuses the CPU pointer
    (ValueError). Either way nothing runs."""
    stores_one[(1,)](torch.zeros(1, dtype=torch.int32), 3)
    raise AssertionError("the kernel launched")  # not reached


def wrong_result(*args, **kwargs):
    """The reference's output with its first emitted token changed."""
    out = reference(*args, **kwargs)
    rows = out.output_token_ids
    first = int((rows.flatten() >= 0).nonzero()[0, 0])
    vocab = (args[2] if len(args) > 2 else kwargs.get("target_logits", kwargs.get(
        "target_probs"))).shape[-1]
    rows.view(-1)[first] = (rows.view(-1)[first] + 1) % vocab
    return out


def wrong_on_tp_rank_1(*args, **kwargs):
    """The reference on tensor-parallel rank 0, wrong_result on rank 1: a
    candidate that only one rank's check can catch."""
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tp_group().rank_in_group == 1:
        return wrong_result(*args, **kwargs)
    return reference(*args, **kwargs)
