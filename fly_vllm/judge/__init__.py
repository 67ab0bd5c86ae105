"""The learned judge: a linear head on the target's hidden state that tells a
mismatch that would change the answer from one that would not (AutoJudge,
arXiv 2504.20039), mined and trained for the user's own pair.

One concept per module:

- ``features``: what the head reads at a verified draft position, computed by
  one function for mining, training and serving;
- ``head``: the head file (weights, feature spec, the pair it was trained on)
  and its score;
- ``score``: the head's score per draft (torch, or a Triton row pass on GPUs);
- ``gate``: the ``"judge"`` gate inside FLy's verification;
- ``record``: the verifier-side recorder that mining switches on;
- ``mine`` and ``train``: ``fly-vllm judge mine`` and ``fly-vllm judge
  train``, which fits the head (``fit``: cross-validation by item, the
  learning curve), measures it on held-out items (``evaluate``: AUCs,
  thresholds, curves) and writes its ``report``; ``check``: ``fly-vllm judge
  check``; ``assess``: ``fly-vllm judge assess``, a head on other mined items;
- ``kernel_check``: ``fly-vllm selftest``'s random heads and steps for the
  score.
"""

from __future__ import annotations

import sys


def run_command(prog: str, parser, run, error: type[Exception], argv=None, check=None) -> int:
    """A judge command's ``main``: parse ``argv`` (default: sys.argv), keep
    it on the args (the results record the command), then ``run(args)``.
    ``check(args)`` returns a message for arguments out of range; that, or
    ``error`` raised by ``run``, is printed after ``prog`` and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    why = check(args) if check is not None else None
    try:
        if why is not None:
            raise error(why)
        return run(args)
    except error as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
