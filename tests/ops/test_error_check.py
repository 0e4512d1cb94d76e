"""error_check="backward": the forward does not wait for the error flags, the flagged tokens'
results are NaN, and backward raises the error the forward would have raised, before any
gradient reaches the inputs. On valid inputs the results and gradients are those of the default
check, bit for bit. On the CPU and (marked cuda) on a GPU, where the check waits for an event."""
import pytest
import torch

from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
from tests.helpers import random_logits

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
NONFINITE = r"contain NaN or Inf in 1 of 6 tokens \(first: flattened token 4\)"


def _kl(expected_grad):
    def op(student, teacher, weights, **kw):
        return vocab_parallel_kl(student, teacher, expected_grad=weights if expected_grad else None, **kw)
    return op


def _logprob(student, target, weights, **kw):
    return vocab_parallel_logprob(student, target, **kw)


OPS = {"kl": _kl(False), "kl_expected_grad": _kl(True), "logprob": _logprob}


def _inputs(device, gen, dtype=torch.bfloat16, rows=6, vocab=1000):
    student = random_logits((rows, vocab), dtype, gen).to(device)
    teacher = random_logits((rows, vocab), dtype, gen).to(device)
    target = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    weights = torch.rand(rows, generator=gen).to(device)
    return student, teacher, target, weights


def _second(name, teacher, target):
    return target if name == "logprob" else teacher


def _run(name, student, second, weights, error_check):
    leaf = student.detach().clone().requires_grad_()
    out = OPS[name](leaf, second, weights, error_check=error_check)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_same_results_as_the_forward_check(device, name, gen):
    student, teacher, target, weights = _inputs(device, gen)
    second = _second(name, teacher, target)
    out, grad = _run(name, student, second, weights, "forward")
    out_b, grad_b = _run(name, student, second, weights, "backward")
    assert torch.equal(out, out_b) and torch.equal(grad, grad_b)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logits_raise_in_backward(device, name, bad, gen):
    student, teacher, target, weights = _inputs(device, gen)
    student[4, 777] = bad
    second = _second(name, teacher, target)
    leaf = student.detach().clone().requires_grad_()
    with pytest.raises(FloatingPointError, match=NONFINITE):  # the default: in the forward
        OPS[name](leaf, second, weights)
    out = OPS[name](leaf, second, weights, error_check="backward")  # does not raise
    assert torch.isnan(out[4]) and torch.isfinite(out[torch.arange(6, device=device) != 4]).all()
    loss = (out * weights).sum()
    with pytest.raises(FloatingPointError, match=NONFINITE):
        loss.backward()
    assert leaf.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_nonfinite_raises_in_backward(device, gen):
    student, teacher, _, weights = _inputs(device, gen)
    teacher[4, 3] = float("-inf")
    leaf = student.detach().clone().requires_grad_()
    out = vocab_parallel_kl(leaf, teacher, error_check="backward")
    with pytest.raises(FloatingPointError, match="teacher logits " + NONFINITE):
        (out * weights).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_target_out_of_range_is_nan_then_raises_in_backward(device, gen):
    student, _, target, weights = _inputs(device, gen)
    target[2] = -100  # an ignore index: finite and meaningless if it were not marked
    leaf = student.detach().clone().requires_grad_()
    out = vocab_parallel_logprob(leaf, target, error_check="backward")
    assert torch.isnan(out[2]) and int(torch.isnan(out).sum()) == 1
    with pytest.raises(ValueError, match=r"1 of 6 tokens are outside it \(first: flattened token 2, "
                                         r"target -100\)"):
        (out * weights).sum().backward()
    assert leaf.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_without_a_backward_the_forward_checks(device, name, gen):
    """No gradient will be taken (no_grad, or logits not requiring grad): nothing could raise
    later, so "backward" checks in the forward."""
    student, teacher, target, weights = _inputs(device, gen)
    student[4, 1] = float("nan")
    second = _second(name, teacher, target)
    with torch.no_grad(), pytest.raises(FloatingPointError, match=NONFINITE):
        OPS[name](student.clone().requires_grad_(), second, weights, error_check="backward")
    with pytest.raises(FloatingPointError, match=NONFINITE):
        OPS[name](student, second, weights, error_check="backward")


def test_unknown_error_check_is_an_error(gen):
    student, teacher, target, _ = _inputs("cpu", gen)
    with pytest.raises(ValueError, match=r"error_check must be one of \('forward', 'backward'\)"):
        vocab_parallel_kl(student, teacher, error_check="never")
    with pytest.raises(ValueError, match="error_check must be one of"):
        vocab_parallel_logprob(student, target, error_check=None)
