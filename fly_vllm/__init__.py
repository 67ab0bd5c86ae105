"""fly-vllm: FLy loose speculative decoding as a vLLM plugin.

Importing this package imports neither torch nor vLLM; vLLM loads the plugin
through the ``vllm.general_plugins`` entry point (``fly_vllm.plugin:register``).
"""

__version__ = "0.1.0"
