"""Tiny EAGLE-3 and EAGLE-1 draft heads for the tiny Llama targets of
fly_vllm/tinymodels.py, for tests: trained in plain torch on the target's
own greedy text (seconds, cached, bit-for-bit repeatable), so that vLLM's
EAGLE speculation has heads whose drafts it accepts. A random head drafts
nothing the target accepts.

What vLLM 0.32 feeds a head (read from its llama_eagle3.py / llama.py): for
each id k in the head config's ``eagle_aux_hidden_state_layer_ids``, the
target's residual stream after k layers, before the final norm (k = 0 is
the embedding output), joined in ascending order; later draft steps feed
back the head's own pre-norm output. A head without ``embed_tokens`` (or
``lm_head``) shares the target's. ``d2t`` is read only when
``draft_vocab_size`` differs from the target's vocabulary: these heads use
the full vocabulary and ship none.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from fly_vllm.tinymodels import _CORPUS, MARKER, built, mark_built

# The target (random weights of std 0.5) is chaotic: change one early token
# and a third to a half of the later greedy tokens change. One EAGLE-3
# layer cannot follow its two layers from the states at p, so a head of the
# usual shape trained from random weights learns its training text by heart
# and drafts nothing right on new text. The heads here therefore start as
# the target itself, seen one position late (two layers; vLLM runs any
# number), which drafts well on any text, and training then fits them to
# the greedy text that the tests generate.
# ---------------------------------------------------------------------------

# Prompts whose greedy continuations the heads are trained on: the corpus
# lines, and the prompts the end-to-end tests use. Random-token prompts are
# added so that the head sees more of the target's text than these.
_HEAD_PROMPTS = _CORPUS + [
    "The quick brown fox",
    "def add(a, b):",
    "Question: what is 12 plus 30? Answer:",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Numbers: 0 1 2 3",
]


# Bumped when the heads' recipe changes, so that cached heads are rebuilt.
_HEAD_VERSION = 1


def _rms(x, w, eps: float):
    """vLLM's RMSNorm: w * x / sqrt(mean(x^2) + eps)."""
    import torch

    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta: float):
    """Neox-style rotary embedding (vLLM's default for Llama).
    x: [B, heads, T, hd]; pos: [T] (or broadcastable) positions."""
    import torch

    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # [hd/2]
    ang = pos.to(torch.float32)[..., None] * inv  # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _greedy_traces(target_dir: Path, prompts: list[list[int]], length: int, aux_ids):
    """Greedy-decode each prompt with the target (transformers, fp32) up to
    `length` tokens and read the target's states on the whole text.

    Returns ids [N, T], the target's argmax at each position [N, T], its
    residual streams after k layers for k in `aux_ids` ([N, T, H] each,
    pre-norm; k = 0 is the embedding output; what vLLM's Llama collects for
    EAGLE-3), its final normed hidden state [N, T, H] (what EAGLE-1 gets),
    the typical size of its final residual and its weights. Prompts of one
    length are decoded as one batch."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)  # [N, T]
    with torch.no_grad():
        for n, rows in by_len.items():
            x = torch.tensor([prompts[i] for i in rows])  # [b, n]
            out = model(input_ids=x, use_cache=True)
            new = [out.logits[:, -1].argmax(-1)]  # [b] each
            for _ in range(length - n - 1):
                out = model(input_ids=new[-1][:, None], past_key_values=out.past_key_values,
                            use_cache=True)
                new.append(out.logits[:, -1].argmax(-1))
            ids[rows] = torch.cat([x, torch.stack(new, 1)], 1)
        streams: dict[int, torch.Tensor] = {}  # k -> [N, T, H]

        def keep(k):
            return lambda mod, args, out: streams.__setitem__(
                k, out[0] if isinstance(out, tuple) else out)

        hooks = [model.model.embed_tokens.register_forward_hook(keep(0))]
        hooks += [layer.register_forward_hook(keep(k + 1)) for k, layer in enumerate(layers)]
        out = model(input_ids=ids)
        for h in hooks:
            h.remove()
        final = streams[len(layers)]
        normed = model.model.norm(final)
    return {"ids": ids, "argmax": out.logits.argmax(-1), "aux": [streams[k] for k in aux_ids],
            "normed": normed, "final_rms": final.pow(2).mean(-1).sqrt().mean().item(),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _head_classes():
    """The head module (and a weight scaling for training it), defined on
    first use so that importing this file does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def lin(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=False)

    class Norm(nn.Module):
        def __init__(self, h: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(h))

    class Layer(nn.Module):
        """A Llama decoder layer's weights, named as in the checkpoints."""

        def __init__(self, attn_in: int, c: dict, input_norm: bool, hidden_norm: bool):
            super().__init__()
            h, nh, hd, inter = c["hidden"], c["heads"], c["head_dim"], c["inter"]
            self.self_attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj"):
                setattr(self.self_attn, n, lin(attn_in, nh * hd))
            self.self_attn.o_proj = lin(nh * hd, h)
            self.mlp = nn.Module()
            self.mlp.gate_proj, self.mlp.up_proj = lin(h, inter), lin(h, inter)
            self.mlp.down_proj = lin(inter, h)
            if input_norm:
                self.input_layernorm = Norm(h)
            if hidden_norm:
                self.hidden_norm = Norm(h)
            self.post_attention_layernorm = Norm(h)

    class Head(nn.Module):
        """An EAGLE head as vLLM runs it, for training.

        kind "eagle3" (llama_eagle3.py): layer 0's attention reads
        cat(input_layernorm(embed), hidden_norm(hidden)) [.., 2H] and its
        residual is `hidden` (or hidden_norm(hidden) with
        norm_before_residual); later layers are plain Llama layers; the
        output is norm(pre) -> own lm_head, and `pre` (pre-norm) is fed back.
        kind "eagle" (llama_eagle.py): x = fc(cat(embed, hidden)) [.., H]
        feeds layer 0 with no input norm and is its residual; `pre` goes
        straight to the target's LM head (no final norm) and is fed back."""

        def __init__(self, kind: str, c: dict, lm_head):
            super().__init__()
            self.kind, self.c = kind, c
            h = c["hidden"]
            e3 = kind == "eagle3"
            self.fc = lin(c["n_aux"] * h if e3 else 2 * h, h)
            self.layers = nn.ModuleList(
                [Layer(2 * h if e3 and i == 0 else h, c, e3 or i > 0, e3 and i == 0)
                 for i in range(c["layers"])])
            if e3:
                self.norm = Norm(h)
                self.lm_head = lin(h, lm_head.shape[0])
                self.lm_head.weight.data.copy_(lm_head)
            else:  # the target's, shared by vLLM, frozen
                self.register_buffer("lm_head_weight", lm_head.clone(), persistent=False)

        def attend(self, q, keys):
            """q [B, nh, T, hd] at chain positions p + j. keys[0] = (k, v)
            [B, nh, T, hd] of the first pass (target-fed), seen causally
            (s <= p); keys[1:] = the chain's own entries from steps 1..j
            (one per chain p, so a diagonal)."""
            scale = q.shape[-1] ** -0.5
            k0, v0 = keys[0]
            T = q.shape[2]
            s0 = (q @ k0.transpose(-1, -2)) * scale  # [B, nh, T, T]
            s0 = s0.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            diag = [(q * k).sum(-1, keepdim=True) * scale for k, _ in keys[1:]]  # [B, nh, T, 1]
            p = torch.cat([s0, *diag], -1).softmax(-1)
            out = p[..., :T] @ v0
            for i, (_, v) in enumerate(keys[1:]):
                out = out + p[..., T + i: T + i + 1] * v
            return out

        def attention(self, layer, x, pos, keys):
            c = self.c
            B, T, _ = x.shape
            heads = lambda t: t.view(B, T, c["heads"], c["head_dim"]).transpose(1, 2)  # noqa: E731
            at = layer.self_attn
            q = _rope(heads(at.q_proj(x)), pos, c["theta"])
            k = _rope(heads(at.k_proj(x)), pos, c["theta"])
            keys.append((k, heads(at.v_proj(x))))
            a = self.attend(q, keys).transpose(1, 2).reshape(B, T, -1)
            return at.o_proj(a)

        def step(self, emb, hid, pos, keys):
            """One drafter pass. emb, hid [B, T, H]; pos [T]; keys: per
            layer, the (k, v) of earlier passes (appended to). Returns
            logits [B, T, V] and the hidden state fed back [B, T, H]."""
            eps = self.c["eps"]
            mlp = lambda m, x: m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))  # noqa: E731
            l0 = self.layers[0]
            if self.kind == "eagle3":
                hn = _rms(hid, l0.hidden_norm.weight, eps)
                x = torch.cat([_rms(emb, l0.input_layernorm.weight, eps), hn], -1)  # [B, T, 2H]
                resid = hn if self.c["norm_before_residual"] else hid
            else:
                x = resid = self.fc(torch.cat([emb, hid], -1))  # [B, T, H]
            for i, layer in enumerate(self.layers):
                if i > 0:
                    resid = m + resid
                    x = _rms(resid, layer.input_layernorm.weight, eps)
                resid = self.attention(layer, x, pos, keys[i]) + resid
                m = mlp(layer.mlp, _rms(resid, layer.post_attention_layernorm.weight, eps))
            pre = m + resid
            if self.kind == "eagle3":
                return self.lm_head(_rms(pre, self.norm.weight, eps)), pre
            return pre @ self.lm_head_weight.T, pre

        def unroll(self, embeds, first_hidden, steps: int):
            """Teacher-forced drafting from every position at once.
            embeds [B, T + steps, H]: embeddings of x[1:] (padded); chain p
            at step j reads embeds[:, p + j]. first_hidden [B, T, *]: what
            vLLM passes at p (the aux states for EAGLE-3, through fc here;
            the target's normed state for EAGLE-1). Returns logits per
            step, [B, T, V] each."""
            T = first_hidden.shape[1]
            hid = self.fc(first_hidden) if self.kind == "eagle3" else first_hidden
            keys: list = [[] for _ in self.layers]
            out = []
            for j in range(steps):
                logits, hid = self.step(embeds[:, j: j + T], hid, torch.arange(T) + j, keys)
                out.append(logits)
            return out

        def checkpoint(self) -> dict:
            """The live weights under the names vLLM's loader reads
            (EAGLE-3 layer 0 is "midlayer")."""
            w = self.state_dict(keep_vars=True)
            if self.kind == "eagle3":
                w = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                     for k, v in w.items()}
            return w

    class Scale(nn.Module):
        """A parametrization: weight = trained * scale (see _init_from_target)."""

        def __init__(self, scale):
            super().__init__()
            self.register_buffer("scale", scale)

        def forward(self, x):
            return x * self.scale

        def right_inverse(self, y):
            return y / self.scale

    return Head, Scale


def _random_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """`n` prompts of 4 random ordinary tokens (one length: one batch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, 4), generator=g).tolist()


def _head_prompts(tok, vocab: int, seed: int, n_random: int, max_len: int) -> list[list[int]]:
    """The natural prompts (token ids, cut to `max_len`) and `n_random`
    random prompts drawn with `seed`."""
    return [tok(p).input_ids[:max_len] for p in _HEAD_PROMPTS] + _random_prompts(
        vocab, n_random, seed)


@contextmanager
def _one_thread():
    """Torch on one thread meanwhile: these models are so small that a
    second thread only adds waiting (3x slower on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _head_inputs(kind: str, trace: dict, steps: int):
    """Training tensors from a trace: embeddings of x[1:] padded by `steps`
    [N, T - 1 + steps, H], the hidden state vLLM passes at each p
    [N, T - 1, n_aux * H or H], and the labels per step (the target's argmax
    at p + 1 + j, -100 past the end) [N, T - 1] each."""
    import torch

    ids, am = trace["ids"], trace["argmax"]  # [N, T]
    N, T = ids.shape
    pad = torch.zeros(N, steps, dtype=ids.dtype)
    table = trace["weights"]["model.embed_tokens.weight"]  # [V, H], shared by vLLM
    emb = table[torch.cat([ids[:, 1:], pad], 1)]  # [N, T - 1 + steps, H]
    lab = torch.cat([am[:, 1:], torch.full((N, steps), -100, dtype=am.dtype)], 1)
    labels = [lab[:, j: j + T - 1] for j in range(steps)]
    if kind == "eagle3":
        first = torch.cat([a[:, :-1] for a in trace["aux"]], -1)  # [N, T - 1, n_aux * H]
    else:
        first = trace["normed"][:, :-1]  # [N, T - 1, H]
    return emb, first, labels


def _accepted(logits: list, labels: list):
    """Per draft step, the share of chains whose drafts 1..j all match (what
    greedy verification accepts), over chains with all labels present."""
    import torch

    ok = torch.stack([(lg.argmax(-1) == lb) for lg, lb in zip(logits, labels)], -1)  # [N, T, K]
    valid = labels[-1] != -100
    run = ok.long().cumprod(-1)[valid]  # [chains, K]
    return run.float().mean(0).tolist()


def _init_from_target(head, w: dict, final_rms: float) -> dict:
    """Start the head as the target itself, shifted by one position (how an
    EAGLE head sees it: slot p holds token p + 1), so that training starts
    from a head that already drafts well. Head layer i takes target layer i.

    EAGLE-3: layer 0's q, k, v read only the embedding half; the target's
    states (through fc, random) enter only the residual, normed first
    (norm_before_residual), so small beside the layers' outputs: the start
    is nearly the copy, and training learns to use them (a head trained
    from hidden_norm = 0 ignores them). norm and lm_head are the target's.

    EAGLE-1 has neither layer 0's input norm nor a final norm before the
    target's LM head, so its residual stream carries f * (the target's),
    f the target's final norm weight over the typical size of its final
    residual (`final_rms`): the LM head then gives about the target's
    logits. Weights reading the stream divide f out, weights writing it
    multiply f in, and the norms use rms(f * r) ~ rms(f) rms(r) (right up
    to a per-token factor, which training absorbs). Started so, it drafts
    less well than the EAGLE-3 start, and trains to a little less well.

    Returns {module: scale} for the weights set to (target weight) * scale
    with a scale other than 1: training steps in the target's units, as
    Adam's equal-sized steps would swamp the weights that f makes tiny."""
    import torch

    scales: dict = {}

    def put(mod, raw, scale=None):
        mod.weight.copy_(raw if scale is None else raw * scale)
        if scale is not None:
            scales[mod] = torch.as_tensor(scale).expand_as(raw).clone()

    with torch.no_grad():
        f = None
        if head.kind == "eagle3":
            put(head.norm, w["model.norm.weight"])
        else:
            f = w["model.norm.weight"] / final_rms  # [H]
            rf = f.pow(2).mean().sqrt()
            emb = w["model.embed_tokens.weight"]  # [V, H]
            inv_rms = emb.pow(2).mean(-1).rsqrt().mean()  # layer 0's missing input norm
            H = f.shape[0]
            eye = torch.cat([torch.eye(H), torch.zeros(H, H)], 1)  # [H, 2H]
            put(head.fc, eye, f[:, None])  # embed -> f * embed; the hidden half unused
        for i, layer in enumerate(head.layers):
            t = f"model.layers.{i}."
            reads = writes = norm = None
            if f is not None:
                writes, norm = f[:, None], rf / f
                if i == 0:  # layer 0's input norm, folded into q, k, v
                    reads = (w[t + "input_layernorm.weight"] * inv_rms / f)[None, :]
            for n in ("q_proj", "k_proj", "v_proj"):
                src = w[t + f"self_attn.{n}.weight"]
                dst = getattr(layer.self_attn, n)
                if dst.weight.shape != src.shape:  # EAGLE-3 layer 0: the embedding half only
                    src = torch.cat([src, torch.zeros_like(src)], 1)
                put(dst, src, reads)
            put(layer.self_attn.o_proj, w[t + "self_attn.o_proj.weight"], writes)
            for n in ("gate_proj", "up_proj"):
                put(getattr(layer.mlp, n), w[t + f"mlp.{n}.weight"])
            put(layer.mlp.down_proj, w[t + "mlp.down_proj.weight"], writes)
            put(layer.post_attention_layernorm, w[t + "post_attention_layernorm.weight"], norm)
            if hasattr(layer, "input_layernorm"):
                put(layer.input_layernorm, w[t + "input_layernorm.weight"], norm if i > 0 else None)
            if hasattr(layer, "hidden_norm"):
                put(layer.hidden_norm, torch.ones_like(layer.hidden_norm.weight))
    return scales


def _build_head(kind: str, out_dir, target_dir, *, seed: int, aux_layer_ids, init: str,
                layers: int, length: int, n_random: int, train_steps: int, unroll: int,
                lr: float, batch: int) -> Path:
    """Shared builder of build_tiny_eagle3 and build_tiny_eagle (see there)."""
    out, target = Path(out_dir), Path(target_dir)
    tmarker = target / MARKER
    spec = dict(version=_HEAD_VERSION, kind=kind, target=str(target.resolve()),
                target_spec=json.loads(tmarker.read_text()) if tmarker.exists() else None,
                seed=seed, aux_layer_ids=None if aux_layer_ids is None else list(aux_layer_ids),
                layers=layers, init=init, length=length, n_random=n_random,
                train_steps=train_steps, unroll=unroll, lr=lr, batch=batch)
    if built(out, spec):
        return out
    if init not in ("target", "random"):
        raise ValueError(f"init must be 'target' or 'random', not {init!r}")
    with _one_thread():
        _make_head(out, target, spec)
    mark_built(out, spec)
    return out


def _make_head(out: Path, target: Path, s: dict) -> None:
    """Decode the training text, start, train and write the head `s` asks for."""
    import torch
    from safetensors.torch import save_file
    from torch.nn.utils import parametrize
    from transformers import AutoTokenizer, LlamaConfig

    tcfg = LlamaConfig.from_pretrained(target)
    H, V, nh = tcfg.hidden_size, tcfg.vocab_size, tcfg.num_attention_heads
    kind, aux = s["kind"], s["aux_layer_ids"] or []
    if s["init"] == "target" and s["layers"] > tcfg.num_hidden_layers:
        raise ValueError(f"a head started as the target has at most "
                         f"{tcfg.num_hidden_layers} layers")
    prompts = _head_prompts(AutoTokenizer.from_pretrained(target), V, s["seed"],
                            s["n_random"], s["length"] - 16)
    trace = _greedy_traces(target, prompts, s["length"], aux)
    # Layers as wide as the target's, so that the head can start as its copy.
    cfg = dict(hidden=H, heads=nh, head_dim=getattr(tcfg, "head_dim", None) or H // nh,
               inter=tcfg.intermediate_size, layers=s["layers"], n_aux=len(aux),
               eps=tcfg.rms_norm_eps, norm_before_residual=s["init"] == "target",
               theta=float((tcfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    torch.manual_seed(s["seed"])
    w = trace["weights"]
    Head, Scale = _head_classes()
    head = Head(kind, cfg, w["lm_head.weight"])
    scales = _init_from_target(head, w, trace["final_rms"]) if s["init"] == "target" else {}
    for mod, scale in scales.items():
        parametrize.register_parametrization(mod, "weight", Scale(scale))
    emb, first, labels = _head_inputs(kind, trace, s["unroll"])
    with torch.no_grad():
        before = _accepted(head.unroll(emb, first, s["unroll"]), labels)
    _fit(head, emb, first, labels, s)
    with torch.no_grad():
        after = _accepted(head.unroll(emb, first, s["unroll"]), labels)
    for mod in scales:
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)

    out.mkdir(parents=True, exist_ok=True)
    if kind == "eagle3":
        extra = dict(architectures=["LlamaForCausalLMEagle3"],
                     eagle_aux_hidden_state_layer_ids=list(aux), num_aux_hidden_states=len(aux),
                     target_hidden_size=H, draft_vocab_size=V,
                     norm_before_residual=cfg["norm_before_residual"])
    else:
        extra = dict(architectures=["EagleLlamaForCausalLM"])
    LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=cfg["inter"],
        num_hidden_layers=s["layers"], num_attention_heads=nh, num_key_value_heads=nh,
        head_dim=cfg["head_dim"], max_position_embeddings=tcfg.max_position_embeddings,
        rms_norm_eps=tcfg.rms_norm_eps, rope_parameters=tcfg.rope_parameters,
        bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
        pad_token_id=tcfg.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
        **extra).save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in head.checkpoint().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "fly_train.json").write_text(json.dumps(
        {"accept_per_step_before": before, "accept_per_step_after": after}))


def _fit(head, emb, first, labels, s: dict) -> None:
    """AdamW on random batches of texts: cross entropy of every draft step
    against the target's argmax, step j weighted 0.8^j; linear decay."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=s["lr"],
                            weight_decay=0.0)
    n = s["train_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(n, 1))
    g = torch.Generator().manual_seed(s["seed"])
    for _ in range(n):
        idx = torch.randperm(first.shape[0], generator=g)[: s["batch"]]
        logits = head.unroll(emb[idx], first[idx], s["unroll"])  # [b, T - 1, V] per step
        loss = sum(0.8 ** j * F.cross_entropy(lg.flatten(0, 1), lb[idx].flatten(),
                                              ignore_index=-100)
                   for j, (lg, lb) in enumerate(zip(logits, labels)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def build_tiny_eagle3(
    out_dir: str | Path,
    target_dir: str | Path,
    *,
    seed: int = 0,
    aux_layer_ids: tuple[int, ...] | None = None,
    init: str = "target",
    layers: int | None = None,
    length: int = 72,
    n_random: int = 21,
    train_steps: int = 100,
    unroll: int = 4,
    lr: float | None = None,
    batch: int = 8,
) -> Path:
    """Write an EAGLE-3 head for the tiny Llama in `target_dir` to `out_dir`
    (config.json, model.safetensors; no tokenizer, vLLM uses the target's)
    and train it on the target's own greedy text. Returns the folder;
    a folder already holding the same build is kept (fly_tiny.json).

    vLLM 0.32 loads it with speculative_config {"method": "eagle3",
    "model": out_dir} (architecture LlamaForCausalLMEagle3). It reads the
    target's residual streams after k layers for k in `aux_layer_ids`
    (default all of them, 0..L: for L = 2 vLLM's own default is unusable)
    and shares the target's embedding; its LM head is its own.

    init "target" (default): `layers` (default L) decoder layers started as
    the target shifted by one position (see _init_from_target), then
    trained. vLLM accepted 38% of 4 drafts on greedy text from 8 prompts:
    ~75% on the 4 it trains on (tests/test_e2e.py's), ~20% on 4 new ones.
    init "random": the usual single layer from random weights; on this
    chaotic target it only learns its training text by heart, drafting
    nothing right on new text (lr defaults to 3e-3; give it ~300 steps).

    Training: `n_random` random prompts (drawn with `seed`) and the fixed
    prompts in _HEAD_PROMPTS, greedy-decoded to `length` tokens; `unroll`
    draft steps per position as vLLM runs them (the head's own hidden state
    fed back), cross entropy against the target's argmax, `train_steps`
    AdamW steps of `batch` texts. fly_train.json records the acceptance per
    draft step on the training text before and after."""
    from transformers import LlamaConfig

    n = LlamaConfig.from_pretrained(target_dir).num_hidden_layers
    if aux_layer_ids is None:
        aux_layer_ids = tuple(range(n + 1))
    return _build_head("eagle3", out_dir, target_dir, seed=seed, aux_layer_ids=aux_layer_ids,
                       init=init, layers=layers or (1 if init == "random" else n),
                       length=length, n_random=n_random, train_steps=train_steps,
                       unroll=unroll, lr=lr or (3e-3 if init == "random" else 3e-4),
                       batch=batch)


def build_tiny_eagle(
    out_dir: str | Path,
    target_dir: str | Path,
    *,
    seed: int = 0,
    init: str = "target",
    layers: int | None = None,
    length: int = 72,
    n_random: int = 21,
    train_steps: int = 100,
    unroll: int = 4,
    lr: float | None = None,
    batch: int = 8,
) -> Path:
    """Write an EAGLE-1 head for the tiny Llama in `target_dir` to `out_dir`
    (config.json, model.safetensors), built and trained as build_tiny_eagle3
    builds its heads. Returns the folder; a same build is kept.

    vLLM 0.32 loads it with speculative_config {"method": "eagle", "model":
    out_dir} (architecture EagleLlamaForCausalLM). It reads the target's
    final normed hidden state and shares the target's embedding and LM
    head: the checkpoint holds neither, and vLLM's EAGLE-1 model has no
    final norm. vLLM accepted 31% of 4 drafts on greedy text from 8 prompts:
    ~75% on the 4 it trains on, ~13% on 4 new ones."""
    from transformers import LlamaConfig

    n = LlamaConfig.from_pretrained(target_dir).num_hidden_layers
    return _build_head("eagle", out_dir, target_dir, seed=seed, aux_layer_ids=None,
                       init=init, layers=layers or (1 if init == "random" else n),
                       length=length, n_random=n_random, train_steps=train_steps,
                       unroll=unroll, lr=lr or (3e-3 if init == "random" else 3e-4),
                       batch=batch)


def eagle_head_agreement(head_dir: str | Path, target_dir: str | Path, *, seed: int = 1000,
                         n_prompts: int = 16, length: int = 64, steps: int = 4,
                         prompts: list[str] | None = None,
                         shuffle_hidden: bool = False) -> list[float]:
    """How well a head built here drafts for its target, without vLLM.

    The target greedy-decodes `prompts` (else `n_prompts` random prompts
    drawn with `seed`: held out, as the builders draw theirs with their own
    seed) to `length` tokens; the saved head drafts `steps` tokens from
    every position as vLLM would. Entry j of the result is the share of
    positions whose drafts 1..j+1 all match the target's greedy tokens;
    their mean is about the acceptance rate that greedy verification of
    `steps` drafts sees (walking these drafts through verification gave
    vLLM's counters to within 2%). `shuffle_hidden` gives each text the
    target's hidden states of another, to show how much the head reads
    them."""
    import torch
    from safetensors.torch import load_file

    head_dir, target_dir = Path(head_dir), Path(target_dir)
    hc = json.loads((head_dir / "config.json").read_text())
    kind = "eagle3" if "LlamaForCausalLMEagle3" in hc["architectures"] else "eagle"
    aux = hc.get("eagle_aux_hidden_state_layer_ids", [])
    if prompts is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(target_dir)
        ids = [tok(p).input_ids for p in prompts]
    else:
        vocab = json.loads((target_dir / "config.json").read_text())["vocab_size"]
        ids = _random_prompts(vocab, n_prompts, seed)
    cfg = dict(hidden=hc["hidden_size"], heads=hc["num_attention_heads"],
               head_dim=hc["head_dim"], inter=hc["intermediate_size"],
               layers=hc["num_hidden_layers"], n_aux=len(aux), eps=hc["rms_norm_eps"],
               norm_before_residual=hc.get("norm_before_residual", False),
               theta=float((hc.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    with _one_thread(), torch.no_grad():
        trace = _greedy_traces(target_dir, ids, length, aux)
        head = _head_classes()[0](kind, cfg, trace["weights"]["lm_head.weight"])
        live, saved = head.checkpoint(), load_file(str(head_dir / "model.safetensors"))
        assert set(saved) == set(live), (sorted(saved), sorted(live))
        for name, t in saved.items():
            live[name].copy_(t)
        emb, first, labels = _head_inputs(kind, trace, steps)
        if shuffle_hidden:
            first = first.roll(1, 0)  # [N, T - 1, *]: text i gets text i - 1's
        return _accepted(head.unroll(emb, first, steps), labels)
