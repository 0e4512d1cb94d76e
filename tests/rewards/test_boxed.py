r"""extract_boxed and answer normalization: the verifier's edge cases."""
import pytest

from scope_megatron.rewards import exact_match, extract_boxed, normalize_answer


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{81}", "81"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                 # nested braces
    (r"\boxed{{a}{b{c}}} done", "{a}{b{c}}"),
    (r"first \boxed{1} then \boxed{2}", "2"),                 # the last box wins
    (r"\boxed{\boxed{5}}", "5"),                              # the last opening is the inner one
    (r"\boxed {7}", "7"),                                     # whitespace before the brace
    (r"\boxed{}", ""),
    (r"\boxed{ 0 81 }", " 0 81 "),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                       # escaped braces do not count
    ("no answer", None),
    ("", None),
    (r"\boxed{12", None),                                     # unbalanced
    (r"\boxed{1} and \boxed{2", None),                        # the final box is broken
    (r"\boxed{\frac{1}{2}", None),
    (r"\boxed 12", None),                                     # no brace
    (r"\boxed{1}}}", "1"),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_adversarial_input():
    text = r"\boxed{" + "{" * 200_000 + "}" * 199_999
    assert extract_boxed(text) is None
    assert extract_boxed(text + "}}") == "{" * 200_000 + "}" * 200_000


@pytest.mark.parametrize("answer, normalized", [
    ("81", "81"), (" 81 ", "81"), ("0081", "81"), ("0 81", "81"), ("+7", "7"), ("-007", "-7"),
    ("-0", "0"), ("000", "0"), ("1" + "0" * 5000, "1" + "0" * 5000),
    (r" \frac{1}{2} ", r"\frac{1}{2}"), ("x  +\n y", "x + y"), ("1.50", "1.50"),
])
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_exact_match():
    assert exact_match("081", "81") and exact_match(" 81", "81 ")
    assert not exact_match("8 1.0", "81") and not exact_match("-81", "81")
    assert not exact_match("", "0")
