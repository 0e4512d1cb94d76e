"""Loading of the compiled extension scope_megatron._C.

There is deliberately no pure-Python fallback: a missing or stale build is an error that says how
to build, never a silent switch to slower code.
"""
from __future__ import annotations

import functools

BUILD_HINT = (
    "Build it from the repository root with `make setup` (creates .venv), or inside your own "
    "environment with torch already installed: `pip install --no-build-isolation -e .`"
)


@functools.lru_cache(maxsize=None)
def load_extension():
    """Imports scope_megatron._C (which registers torch.ops.scope_megatron.*) and returns it."""
    import torch  # noqa: F401  (the extension links against libtorch)

    try:
        from scope_megatron import _C
    except ImportError as exc:
        raise ImportError(
            f"scope_megatron's compiled extension scope_megatron._C could not be imported ({exc}). "
            + BUILD_HINT
        ) from exc
    return _C


def require_device_support(*tensors) -> None:
    """Raises a clear error when a CUDA tensor meets a build without the CUDA kernels."""
    for t in tensors:
        if t is not None and t.is_cuda and not load_extension().built_with_cuda():
            raise RuntimeError(
                "scope_megatron was built without its CUDA kernels but got a CUDA tensor. Rebuild "
                "on a machine with nvcc and a CUDA-enabled torch: "
                "SCOPE_MEGATRON_CUDA=1 pip install --no-build-isolation -e ."
            )
