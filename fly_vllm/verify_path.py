"""Which verifier runs, checked.

The rule:

1. The *reference* of a rule is its torch verifier,
   ``fly_vllm.verifier.fly_verify`` ("fly") or ``fly_vllm.fsd.fsd_verify``
   ("fsd"): correct by definition, and it runs on any device.
2. The *candidate* is the accelerated verifier: on CUDA and ROCm devices
   (torch's "cuda" device type) the rule's Triton kernels, elsewhere none.
   ``FLY_VLLM_VERIFIER``, a debugging and testing hook, overrides that
   choice: ``torch`` runs the reference unchecked; ``module:function`` names
   a candidate with the reference's signature, checked on any device, the
   CPU included (path "custom").
3. Before its first real use the candidate is *probed*: run on small random
   batches built like the engine's (its rule's settings, K and vocabulary;
   every max_spec_len block size it can reach; greedy and sampled rows, each
   with and without a veto mask; with and without margin bounds and strict
   prefixes: ``verify_cases.probe_shapes``), so that Triton compiles every
   specialisation the engine will use, and compared with the reference
   (``compare``). If it fails to load, compile or launch, or disagrees, ONE
   warning names the error and the device, and the reference verifies from
   then on.
4. Later calls: an error Triton raises before a launch (compiling a
   specialisation the probe did not reach, running out of shared memory)
   makes the same single fallback, and that step is verified by the
   reference. Other errors propagate: a fault inside a running kernel (an
   illegal address) surfaces asynchronously and leaves the CUDA/HIP context
   unusable, so no fallback in this process can recover from it. A probe
   that leaves the device unusable raises an error that says so and names
   ``FLY_VLLM_VERIFIER=torch``.
5. With tensor parallelism every rank verifies the same batch and must
   decide alike (fly_vllm.parallel): the check's outcome is agreed over the
   TP group, so a failure on any rank moves every rank to the reference;
   rule 4's later fallback, which one rank alone would take, stops the
   engine with an error instead.
6. The path shows in ``CheckedVerifier.describe()`` (the start-up log line's
   ``path=``: "triton", "torch", "custom module:function", or "torch (triton
   failed: ...)"), and in the metrics ``vllm:fly_verifier_path{path}``
   (workers per path) and ``vllm:fly_verifier_fallbacks_total``.

A verifier, checked or not, is called like the reference: draft_token_ids
[T], cu_num_draft_tokens [B], target logits (fly) or target and draft
probabilities (fsd) [T, V], bonus_token_ids [B, 1], max_spec_len S and the
per-request [B] / per-draft [T] keywords; it returns a ``FlyVerifyOutput``
(output rows [B, S + 1] int32, accepted counts [B], per-draft flags [T]).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fly_vllm import metrics, parallel
from fly_vllm.fsd import fsd_verify
from fly_vllm.verifier import FlyVerifyOutput, fly_verify
from fly_vllm.verify_cases import CaseShape, make_case, probe_shapes

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler
ENV = "FLY_VLLM_VERIFIER"
REFERENCES = {"fly": fly_verify, "fsd": fsd_verify}
TRITON_VERIFIERS = {"fly": "fly_verify_triton", "fsd": "fsd_verify_triton"}
# Compared exactly: every decision and the output rows.
EXACT_FIELDS = ("output_token_ids", "num_accepted", "native", "uncertain", "rescued",
                "in_prefix", "loose_accepted", "gated", "guard_vetoed", "rule_vetoed",
                "positions", "prefix_exact", "margin")
# Summed in another order by the kernels: compared within float tolerance
# (relative 1e-4: a KL divergence sums V terms of both signs).
CLOSE_FIELDS = ("entropy", "divergence")
ATOL, RTOL = 1e-5, 1e-4


@dataclass(frozen=True)
class Candidate:
    """An accelerated verifier, loaded on first use."""

    path: str  # "triton" or "custom" (a metrics.VERIFIER_PATHS label)
    name: str  # for messages: "triton", or "custom module:function"
    module: str
    function: str

    def load(self) -> Callable[..., FlyVerifyOutput]:
        return getattr(importlib.import_module(self.module), self.function)


def triton_candidate(rule: str) -> Candidate:
    return Candidate("triton", "triton", "fly_vllm.kernels", TRITON_VERIFIERS[rule])


def candidate(device: torch.device, rule: str) -> Candidate | None:
    """The candidate to check for ``rule`` on ``device`` (rule 2), or None
    when the reference runs unchecked."""
    choice = os.environ.get(ENV, "").strip()
    if choice == "torch":
        return None
    if choice:
        module, _, function = choice.partition(":")
        if not module or not function:
            raise ValueError(f"{ENV}={choice!r}: expected 'torch' or 'module:function'")
        return Candidate("custom", f"custom {choice}", module, function)
    return triton_candidate(rule) if device.type == "cuda" else None


@dataclass(frozen=True)
class Workload:
    """What the engine will verify: the probe's batches are built from it."""

    rule: str = "fly"
    k: int = 4  # num_speculative_tokens: max_spec_len is 1..k
    vocab: int = 256  # V, the target's vocabulary
    entropy_top_k: int = 3
    fsd_divergence: str = "js"
    fsd_variant: str = "resample"

    @classmethod
    def of(cls, fly, k: int, vocab: int | None = None) -> Workload:
        """From a FlyConfig, the engine's K and its vocabulary size."""
        return cls(fly.rule, max(k, 1), vocab or cls.vocab, fly.entropy_top_k,
                   fly.fsd_divergence, fly.fsd_variant)

    def cases(self, device, seed: int = 0) -> Iterator[tuple[CaseShape, dict]]:
        """The probe's batches, one at a time, drawn on ``device``."""
        g = torch.Generator(device=device).manual_seed(seed)
        for shape in probe_shapes(self.k, self.vocab):
            yield shape, make_case(self.rule, g, shape, device, top_k=self.entropy_top_k,
                                   kind=self.fsd_divergence, variant=self.fsd_variant)


def _same(a: torch.Tensor | None, b: torch.Tensor | None, close: bool = False) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.cpu(), b.cpu()
    if close:
        return torch.allclose(a.float(), b.float(), atol=ATOL, rtol=RTOL, equal_nan=True)
    return a.dtype == b.dtype and torch.equal(a, b)


def compare(got: FlyVerifyOutput, ref: FlyVerifyOutput) -> list[str]:
    """The fields where a verifier's output ``got`` differs from the
    reference's ``ref`` (empty: they agree). Decisions, output rows and
    margins must be equal; entropy and divergence within ATOL and RTOL."""
    return ([f for f in EXACT_FIELDS if not _same(getattr(got, f), getattr(ref, f))]
            + [f for f in CLOSE_FIELDS if not _same(getattr(got, f), getattr(ref, f), True)])


def error_text(e: BaseException, limit: int = 400) -> str:
    """An exception on one line (Triton's compile errors span several)."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def disagreement(fn: Callable[..., FlyVerifyOutput], args: dict,
                 ref: FlyVerifyOutput) -> str | None:
    """Why ``fn`` run on the case ``args`` is not the reference's output
    ``ref``: the error it raised, or the fields it got wrong; None if it
    agrees."""
    try:
        bad = compare(fn(**args), ref)
    except Exception as e:  # compile, launch, or a wrong return type
        return error_text(e)
    return f"disagrees with the torch reference on {', '.join(bad)}" if bad else None


def probe(fn: Callable[..., FlyVerifyOutput], workload: Workload, device) -> str | None:
    """Rule 3: run ``fn`` on the workload's probe batches against the
    reference; the first failure (with its batch), or None."""
    reference = REFERENCES[workload.rule]
    for shape, args in workload.cases(device):
        why = disagreement(fn, args, reference(**args))
        if why is not None:
            return f"{why} (batch {shape})"
    return None


def device_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # an unknown index: the device string says enough
            pass
    return str(device)


def _usable(device: torch.device) -> bool:
    """Whether ``device`` still runs work (a kernel fault poisons it)."""
    try:
        return torch.ones(1, device=device).add_(1).cpu().item() == 2
    except Exception:
        return False


def _pre_launch_errors() -> tuple[type[BaseException], ...]:
    """Triton's errors raised before a launch (rule 4), as far as this
    Triton version has them."""
    found = []
    for module, name in (("triton.errors", "TritonError"),
                         ("triton.compiler.errors", "CompilationError"),
                         ("triton.runtime.errors", "OutOfResources")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _count(path: str, value: int) -> None:
    metrics.worker_store().add(f"verifier_path_{path}", value)


class CheckedVerifier:
    """The verifier that runs for a rule on a device (see the module doc).

    Callable like the reference. ``path`` is "triton", "torch" or "custom";
    ``failure`` says why the candidate was dropped (None if it was not).
    """

    def __init__(self, device: torch.device, cand: Candidate | None, workload: Workload):
        self.rule, self.device, self.candidate = workload.rule, device, cand
        self.reference = REFERENCES[self.rule]
        self.failure: str | None = None
        self._fn: Callable[..., FlyVerifyOutput] | None = None
        self._pre_launch: tuple[type[BaseException], ...] = ()
        self._ranks = False  # tensor-parallel ranks that must decide alike
        if cand is not None:
            try:
                fn = cand.load()
            except Exception as e:  # e.g. no triton: the torch path still works
                why = f"could not load it: {error_text(e)}"
            else:
                try:
                    why = probe(fn, workload, device)
                except Exception as e:  # a fault that surfaced in the reference
                    why = f"the check failed: {error_text(e)}"
            # Rule 5: every tensor-parallel rank takes the same path.
            self._ranks = parallel.tp_group() is not None
            if parallel.any_rank(why is not None) and why is None:
                why = "another tensor-parallel rank's check failed (every rank verifies alike)"
            if why is None:
                self._fn, self._pre_launch = fn, _pre_launch_errors()
            elif not _usable(device):
                raise RuntimeError(
                    f"fly-vllm: the {cand.name} {self.rule} verifier failed on "
                    f"{device_text(device)} ({why}) and left the device unusable, "
                    f"which no fallback can repair; set {ENV}=torch to verify with "
                    "the torch path")
            else:
                self._fall_back(why)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the probe's batches
        _count(self.path, 1)

    @property
    def path(self) -> str:
        return self.candidate.path if self._fn is not None else "torch"

    def describe(self) -> str:
        if self.candidate is None:
            return "torch"
        if self.failure is None:
            return self.candidate.name
        return f"torch ({self.candidate.name} failed: {self.failure})"

    def _fall_back(self, why: str) -> None:
        self.failure, self._fn = why, None
        metrics.worker_store().add("verifier_fallbacks", 1)
        logger.warning(
            "fly-vllm: the %s %s verifier failed on %s: %s; verifying with the torch "
            "path from now on (same results, slower)", self.candidate.name, self.rule,
            device_text(self.device), why)

    def __call__(self, *args, **kwargs) -> FlyVerifyOutput:
        fn = self._fn
        if fn is not None:
            try:
                return fn(*args, **kwargs)
            except self._pre_launch as e:  # rule 4; nothing else is caught
                if self._ranks:  # rule 5: not on this rank alone
                    raise RuntimeError(
                        f"fly-vllm: the {self.candidate.name} {self.rule} verifier failed on "
                        f"{device_text(self.device)} at a later step ({error_text(e)}); "
                        "with tensor parallelism one rank cannot fall back alone, or the "
                        f"ranks' outputs would part; set {ENV}=torch to verify with the "
                        "torch path on every rank") from e
                self._fall_back(f"{error_text(e)} (at a later step)")
                _count(self.candidate.path, -1)
                _count("torch", 1)
        return self.reference(*args, **kwargs)


def select(device: torch.device, workload: Workload) -> CheckedVerifier:
    """The checked verifier for ``workload.rule`` on ``device``."""
    return CheckedVerifier(device, candidate(device, workload.rule), workload)
