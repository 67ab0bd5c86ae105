"""One thin adapter per vLLM model runner: each translates its runner's
verification inputs into a :class:`fly_vllm.core.Step`, runs the shared
:class:`fly_vllm.core.VerificationCore`, and returns the result in its
runner's own output layout.

- ``v1``: model runner V1 (``vllm/v1/worker/gpu_model_runner.py``), whose
  ``RejectionSampler.forward`` stays vLLM's; only the module-level
  ``rejection_sample`` it calls is routed to FLy.
- ``v2``: model runner V2 (``vllm/v1/worker/gpu/``), whose
  ``RejectionSampler._verify`` verifies exactly first; FLy then extends the
  rows it accepts loosely and draws their corrections with vLLM's sampler.

Each is imported only inside vLLM worker processes, by plugin.py's patches.
"""
