"""BoxedMatchVerifier: 0/1 rewards, truncation, the comparison and time-limit hooks."""
import pytest

from scope_megatron.rewards import BoxedMatchVerifier, VerificationTimeout, boxed_match

DONE = {"finished": True}


@pytest.mark.parametrize("text, reference, reward", [
    (r"3+8+0=11 2+5+1=08 \boxed{81}", "81", 1.0),
    (r"\boxed{081}", "81", 1.0),
    (r"\boxed{ 81 }", "81", 1.0),
    (r"\boxed{80}", "81", 0.0),
    (r"\boxed{81} \boxed{80}", "81", 0.0),
    (r"\boxed{80} \boxed{81}", "81", 1.0),
    ("81", "81", 0.0),                      # no box, no answer
    (r"\boxed{81", "81", 0.0),
    (r"\boxed{}", "0", 0.0),
])
def test_rewards(text, reference, reward):
    assert boxed_match(text, reference, metadata=DONE) == reward


def test_truncated_response_is_wrong():
    assert boxed_match(r"\boxed{81}", "81", metadata={"finished": False}) == 0.0
    with pytest.raises(KeyError, match="finished"):
        boxed_match(r"\boxed{81}", "81", metadata={})


def test_compare_is_the_extension_point():
    calls = []

    def half_equals_point_five(predicted, reference):
        calls.append((predicted, reference))
        return {predicted, reference} == {r"\frac{1}{2}", "0.5"}

    verifier = BoxedMatchVerifier(compare=half_equals_point_five)
    assert verifier(r"\boxed{\frac{1}{2}}", "0.5", metadata=DONE) == 1.0
    assert calls == [(r"\frac{1}{2}", "0.5")]
    assert verifier(r"no box", "0.5", metadata=DONE) == 0.0 and len(calls) == 1

    def too_slow(predicted, reference):
        raise VerificationTimeout("answer took longer than 5 s")

    assert BoxedMatchVerifier(compare=too_slow)(r"\boxed{1}", "1", metadata=DONE) == 0.0
    with pytest.raises(TypeError, match="callable"):
        BoxedMatchVerifier(compare="exact")
