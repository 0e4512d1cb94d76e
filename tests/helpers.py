"""Input generators and comparison rules shared by the op tests."""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def random_logits(shape, dtype, gen, *, scale=3.0, kind="normal", device="cpu"):
    """Logits of a given flavour, generated in float64 and rounded once to `dtype`.

    kind: "normal" (N(0, scale^2)), "extreme" (values near +-1e4), "peaked" (one-hot-like: one
    column +1e4 per row, the rest -1e4 plus noise).
    """
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    if kind == "extreme":
        x = torch.sign(x) * 1e4 + torch.randn(*shape, generator=gen, dtype=torch.float64) * 50
    elif kind == "peaked":
        x = -1e4 + torch.randn(*shape, generator=gen, dtype=torch.float64)
        hot = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        x.scatter_(-1, hot.unsqueeze(-1), 1e4)
    elif kind != "normal":
        raise ValueError(kind)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(device)


def value_tolerance(dtype):
    """Results accumulate in float32 from inputs that are exact in float64: tight for all
    dtypes but float64."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype,
                      logit_scale: float = 0.0) -> None:
    """Gradients are written in the logits' dtype: float64 exact, float32 to 1e-5, 16-bit to the
    storage precision (relative to the largest gradient element).

    logit_scale: for the reverse-KL gradient p_j * ((log p_j - log q_j) - KL), whose bracket
    subtracts two numbers as large as the logits (KL ~ 1e4 for disjoint peaked distributions at
    +-1e4): float32 represents them only to eps32 * logit_scale (1e-3 at 1e4), so any float32
    implementation has that absolute error; the absolute tolerance grows to 16 such ulps."""
    scale = max(1.0, float(expected.abs().max()))
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10 * scale)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=max(1e-5 * scale, 16 * 2.0**-23 * logit_scale))
    else:
        tol = dict(rtol=1e-2, atol=1e-2 * scale)
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
