"""The runner-neutral verification core, shared by both model runners.

One concept a module: ``step`` (the inputs of one step, in the rules'
layout), ``settings`` (each request's effective settings and their [B]
tensors), ``guards`` (the quality guards' vetoes), ``recording`` (the
counters), and ``verification`` (the core itself, which runs the rule
through the checked verifier path). The rules are ``fly_vllm.verifier`` and
``fly_vllm.fsd``; the runner adapters are in ``fly_vllm.runners``.
"""

from fly_vllm.core.settings import RequestSettings, SettingsTable, gate_limits
from fly_vllm.core.step import Step
from fly_vllm.core.verification import VerificationCore, Verified, select_verifier

__all__ = ["RequestSettings", "SettingsTable", "Step", "VerificationCore", "Verified",
           "gate_limits", "select_verifier"]
