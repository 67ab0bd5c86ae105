"""fly-vllm: FLy loose speculative decoding as a vLLM plugin.

Importing this package imports neither torch nor vLLM; vLLM loads the plugin
through the ``vllm.general_plugins`` entry point (``fly_vllm.plugin:register``).
"""

__version__ = "0.1.0"


def request_stats(outputs):
    """Per-request FLy totals for offline outputs (``LLM.generate`` or
    ``LLM.chat`` results): sets ``output.fly_stats`` on each and returns the
    list of those dicts, with ``steps`` (verification steps with drafts),
    ``draft_tokens``, ``native_accepted_tokens``, ``loose_accepted_tokens``
    and ``mean_accepted_length`` (1 + accepted / steps; None without steps).
    Requests FLy never verified get zeros.
    """
    from fly_vllm.metrics import REQUEST_FIELDS, request_totals

    totals = request_totals()
    stats = []
    for o in outputs:
        t = dict(totals.get(o.request_id, dict.fromkeys(REQUEST_FIELDS, 0)))
        acc = t["native_accepted_tokens"] + t["loose_accepted_tokens"]
        t["mean_accepted_length"] = 1 + acc / t["steps"] if t["steps"] else None
        try:
            o.fly_stats = t
        except AttributeError:  # an output type without a __dict__
            pass
        stats.append(t)
    return stats
