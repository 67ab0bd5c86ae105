"""The acceptance rules' names and choices, as plain data (no torch, no vLLM).

The rules themselves (``verifier.py``, ``fsd.py``) and the config package
both read these; the rules import nothing from the config, and the config
can be checked on a machine without torch.
"""

RULES = ("fly", "fsd")  # FLy's entropy/margin gate and window; FSD's divergence test
GATES = ("entropy", "margin", "both", "judge")  # what makes a FLy mismatch a candidate
WINDOW_CONVENTIONS = ("vllm", "paper")  # W positions after a candidate, or W - 1
FSD_DIVERGENCES = ("js", "kl_draft_target", "kl_target_draft", "tv")
FSD_VARIANTS = ("resample", "fallback")
