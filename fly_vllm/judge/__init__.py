"""The learned judge: a linear head on the target's hidden state that tells a
mismatch that would change the answer from one that would not (AutoJudge,
arXiv 2504.20039), mined and trained for the user's own pair.

One concept per module:

- ``features``: what the head reads at a verified draft position, computed by
  one function for mining, training and serving;
- ``head``: the head file (weights, feature spec, the pair it was trained on)
  and its score;
- ``gate``: the ``"judge"`` gate inside FLy's verification;
- ``record``: the verifier-side recorder that mining switches on;
- ``mine`` and ``train``: ``fly-vllm judge mine`` and ``fly-vllm judge train``.
"""
