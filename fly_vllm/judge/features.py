"""What the judge reads at a verified draft position, from tensors the
verification step already has (no extra forward pass).

vLLM's runner computes the logits of a spec-decode step from
``sample_hidden_states`` [R, H], the target's final hidden states (after the
last norm, the lm_head's input) at the step's sampled rows. For a request with
n drafts its rows are consecutive: row ``j`` (= ``target_logits_indices[t]``
for draft t = d_i) holds the state after reading the token before d_i, whose
logits verify d_i; row ``j + 1`` holds the state after reading d_i itself (the
next draft's verifying row, or the bonus row for the last draft).

Components, each [T, *]:

- ``h_post``: ``hidden[j + 1]``, the state at d_i's own position: the target
  has read the draft token. AutoJudge's "DT" feature (its best single block).
- ``h_pre``: ``hidden[j]``, the state whose logits chose the target's token.
- ``margin``: ``log p(argmax) - log p(d_i)`` in nats, on the logits that
  verify d_i (FLy's margin gate reads the same number).
- ``entropy``: the top-3 entropy of those logits in nats (FLy's entropy gate).
- ``draft_logprob``, ``top_logprob``: ``log p(d_i)`` and ``log p(argmax)``.

A feature spec is an ordered tuple of component names; the feature vector is
their concatenation in that order (``assemble``). Mining records every
component; training and serving call ``assemble`` with the head's spec, so the
three compute the vector the same way.
"""

from __future__ import annotations

import torch

HIDDEN = ("h_post", "h_pre")
SCALARS = ("margin", "entropy", "draft_logprob", "top_logprob")
COMPONENTS = HIDDEN + SCALARS
ENTROPY_TOP_K = 3


def check_spec(spec) -> tuple[str, ...]:
    """A feature spec as a tuple; ValueError naming an unknown or repeated
    component."""
    spec = tuple(spec)
    if not spec:
        raise ValueError(f"a judge feature spec needs at least one of {list(COMPONENTS)}")
    for name in spec:
        if name not in COMPONENTS:
            raise ValueError(f"unknown judge feature {name!r}; known: {list(COMPONENTS)}")
    if len(set(spec)) != len(spec):
        raise ValueError(f"judge feature spec repeats a component: {list(spec)}")
    return spec


def components(
    hidden: torch.Tensor,  # [R, H] sample_hidden_states
    rows: torch.Tensor,  # [T] int, target_logits_indices
    target_logits: torch.Tensor,  # [T, V] the logits that verify the drafts
    draft_token_ids: torch.Tensor,  # [T] int
    names=COMPONENTS,
) -> dict[str, torch.Tensor]:
    """The named components at each draft (float32; hidden ones [T, H], the
    others [T, 1]). Placeholder drafts (< 0) get draft_logprob -inf."""
    from fly_vllm.verifier import topk_entropy

    out: dict[str, torch.Tensor] = {}
    rows = rows.long()
    if "h_post" in names:
        out["h_post"] = hidden[rows + 1].float()
    if "h_pre" in names:
        out["h_pre"] = hidden[rows].float()
    if any(n in names for n in SCALARS):
        logits = target_logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.max(dim=-1).values - lse
        vocab = logits.shape[-1]
        draft = draft_token_ids.long()
        valid = (draft >= 0) & (draft < vocab)
        dl = logits.gather(-1, draft.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1) - lse
        dl = torch.where(valid, dl, torch.full_like(dl, float("-inf")))
        scalars = {
            "margin": top - dl,
            "entropy": topk_entropy(logits, ENTROPY_TOP_K, lse),
            "draft_logprob": dl,
            "top_logprob": top,
        }
        for n in SCALARS:
            if n in names:
                out[n] = scalars[n].unsqueeze(-1)
    return out


def assemble(parts: dict, spec) -> torch.Tensor | object:
    """The feature matrix [T, D]: the spec's components side by side.

    Works on torch tensors (serving) and numpy arrays (training) alike;
    1-D scalar components are taken as one column. Infinite values (a
    placeholder's margin) become large finite ones, so a score is never NaN.
    """
    cols = []
    for name in check_spec(spec):
        x = parts[name]
        per_row = 1
        for d in x.shape[1:]:
            per_row *= int(d)
        cols.append(x.reshape(x.shape[0], per_row))  # also for 0 rows
    if isinstance(cols[0], torch.Tensor):
        x = torch.cat([c.float() for c in cols], dim=1)
        return torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)
    import numpy as np

    x = np.concatenate([c.astype(np.float32) for c in cols], axis=1)
    return np.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)


def width(spec, hidden_size: int) -> int:
    """D for a spec: H per hidden component, 1 per scalar."""
    return sum(hidden_size if n in HIDDEN else 1 for n in check_spec(spec))
