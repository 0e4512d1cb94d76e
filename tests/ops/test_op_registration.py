"""torch.library registration: opcheck of every raw op (schema, fake/meta kernels, dispatch),
torch.compile through the public ops, the SIMD flavours, and the missing-extension error."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import scope_megatron._C as C
from scope_megatron.ops import (group_normalized_weights, sequence_perplexity, vocab_parallel_kl,
                                vocab_parallel_logprob)
from scope_megatron.ops.reference import kl_reference, logprob_reference

ops = torch.ops.scope_megatron


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 37, generator=g)
    t = torch.randn(5, 37, generator=g)
    target = torch.randint(0, 30, (5,), generator=g)
    lp_stats = ops.logprob_partial(s, target, 0, 30, 1.25)
    _, lp_rows, _ = ops.logprob_combine(lp_stats.unsqueeze(0), 1.25)
    kl_stats = ops.kl_partial(s, t, 0, 30, 0.8, 1.1, True)
    _, kl_rows, _ = ops.kl_combine(kl_stats.unsqueeze(0), True, 0.8, 1.1)
    values = torch.randn(12, generator=g)
    offsets = torch.tensor([0, 4, 5, 12])
    mask = torch.rand(12, generator=g) > 0.3
    lp, count = ops.sequence_logppl(values, mask, offsets)
    fused_w = torch.randn(5, generator=g)
    # two real shards of a 40-column vocabulary (36 true ids): each target owned exactly once
    wide = torch.randn(5, 40, generator=g)
    lp_shards = torch.stack([ops.logprob_partial(wide[:, i * 20:(i + 1) * 20].contiguous(), target, i * 20, 36, 1.25)
                             for i in range(2)])
    return {
        "logprob_partial": (ops.logprob_partial, (s, target, 0, 30, 1.25)),
        "logprob_combine": (ops.logprob_combine, (lp_shards, 1.25)),
        "logprob_backward": (ops.logprob_backward, (torch.randn(5, generator=g), s, target, lp_rows, 0, 30, 1.25)),
        "kl_partial": (ops.kl_partial, (s, t, 0, 30, 0.8, 1.1, False)),
        "kl_combine": (ops.kl_combine, (torch.stack([kl_stats, kl_stats]), True, 0.8, 1.1)),
        "kl_backward": (ops.kl_backward, (torch.randn(5, generator=g), s, t, kl_rows, 0, 30, 0.8, 1.1, True)),
        "kl_fused": (ops.kl_fused, (s, t, torch.randn(5, generator=g), 30, 0.8, 1.1, True)),
        # rows 1 and 3 differ from the weight kl_fused used: rewritten in place
        "kl_backward_fixup": (ops.kl_backward_fixup, (
            ops.kl_fused(s, t, fused_w, 30, 0.8, 1.1, True)[3], fused_w + torch.tensor([0, 1.0, 0, -2.0, 0]),
            fused_w, s, t, ops.kl_fused(s, t, fused_w, 30, 0.8, 1.1, True)[1], 0, 30, 0.8, 1.1, True)),
        "sequence_logppl": (ops.sequence_logppl, (values, mask, offsets)),
        "sequence_logppl_backward": (ops.sequence_logppl_backward, (torch.randn(3, generator=g), mask, offsets, count, 12)),
        "group_weights": (ops.group_weights, (torch.randn(6, generator=g), torch.tensor([0, 1, 0, 2, 1, 0]),
                                              torch.tensor([True, True, False, True, True, True]), 3, -0.5, True)),
    }


CASES = _opcheck_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    torch.library.opcheck(op.default, args)


def test_every_registered_op_is_opchecked():
    registered = {n for n in dir(ops) if not n.startswith("_") and hasattr(getattr(ops, n), "default")}
    assert registered == set(CASES)


def test_torch_compile_traces_through_the_ops():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 300, generator=g, requires_grad=True)
    t = torch.randn(6, 300, generator=g)
    target = torch.randint(0, 290, (6,), generator=g)

    def loss(s, t, target):
        return (vocab_parallel_kl(s, t, vocab_size=290) - vocab_parallel_logprob(s, target, vocab_size=290)).sum()

    compiled = torch.compile(loss, backend="aot_eager")
    out = compiled(s, t, target)
    (grad,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    ref = (kl_reference(s64, t.double(), vocab_size=290) - logprob_reference(s64, target, vocab_size=290)).sum()
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_baseline_simd_flavour_matches():
    """The baseline (non-AVX2) kernels give the same results: run them in a subprocess."""
    script = textwrap.dedent("""
        import torch, scope_megatron._C as C
        from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
        from scope_megatron.ops.reference import kl_reference, logprob_reference
        assert C.cpu_simd_flavour() == "baseline", C.cpu_simd_flavour()
        g = torch.Generator().manual_seed(3)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            s = (torch.randn(9, 2100, generator=g) * 3).to(dtype).requires_grad_()
            t = (torch.randn(9, 2100, generator=g) * 3).to(dtype)
            y = torch.randint(0, 2000, (9,), generator=g)
            out = vocab_parallel_kl(s, t, vocab_size=2000) + vocab_parallel_logprob(s, y, vocab_size=2000)
            (grad,) = torch.autograd.grad(out.sum(), s)
            s64 = s.detach().double().requires_grad_()
            ref = kl_reference(s64, t.double(), vocab_size=2000) + logprob_reference(s64, y, vocab_size=2000)
            (rgrad,) = torch.autograd.grad(ref.sum(), s64)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            scale = float(rgrad.abs().max())
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(grad.double(), rgrad, rtol=tol, atol=tol * scale)
        print("ok")
    """)
    env = dict(os.environ, SCOPE_KERNELS_SIMD="baseline")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_default_simd_flavour_is_reported():
    assert C.cpu_simd_flavour() in ("avx2", "baseline")


def test_missing_extension_says_how_to_build():
    script = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "scope_megatron._C":
                    raise ImportError("simulated: not built")
        sys.meta_path.insert(0, Block())
        try:
            import scope_megatron.ops
        except ImportError as e:
            print(e)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "could not be imported" in res.stdout and "pip install --no-build-isolation -e ." in res.stdout, res.stdout + res.stderr


def test_other_ops_compile(gen):
    torch._dynamo.reset()
    values = -torch.rand(3, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=gen) > 0.2
    mask[:, 0] = True
    eager = sequence_perplexity(values, mask)
    compiled = torch.compile(sequence_perplexity, backend="aot_eager")(values, mask)
    torch.testing.assert_close(eager, compiled)
    w = group_normalized_weights(eager, torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool), sign=1)
    torch.testing.assert_close(w[:2].sum(), torch.tensor(1.0, dtype=torch.float64))
