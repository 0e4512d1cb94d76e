"""The toy addition world: exact format, splits, determinism, the corruption hook."""
import re

import pytest
import torch

from scope_megatron.data import AdditionProblem, ToyArithmetic, ToyArithmeticConfig
from scope_megatron.rewards import boxed_match, score_responses

TASK = ToyArithmetic()  # the embedded default (2000 held-out problems, built in milliseconds)
COLUMN = re.compile(r"(\d)\+(\d)\+(\d)=(\d\d)")


def parse_carry_solution(text):
    """Columns [(a digit, b digit, carry in, sum)] and the boxed answer of a 'carry' solution."""
    match = re.fullmatch(r"((?:\d\+\d\+\d=\d\d )+)\\boxed\{(\d+)\}", text)
    assert match, f"not a carry-trace solution: {text!r}"
    columns = [tuple(map(int, c)) for c in COLUMN.findall(match.group(1))]
    return columns, int(match.group(2))


def test_documented_example():
    p = AdditionProblem(23, 58)
    assert TASK.prompt_text(p) == " 23+ 58="
    assert TASK.tokenizer.decode(TASK.prompt_ids(p), skip_special=False) == "<bos> 23+ 58="
    assert TASK.solution_text(p) == "3+8+0=11 2+5+1=08 \\boxed{81}"
    assert TASK.tokenizer.decode(TASK.solution_ids(p), skip_special=False) == \
        "3+8+0=11 2+5+1=08 \\boxed{81}<eos>"
    assert TASK.solution_text(p, style="direct") == "\\boxed{81}"
    assert TASK.answer(p) == "81"
    assert TASK.solution_text(AdditionProblem(999, 999)) == \
        "9+9+0=18 9+9+1=19 9+9+1=19 \\boxed{1998}"


def test_sizes_match_the_notes(gen):
    assert TASK.prompt_len == 9 and TASK.max_response_len == 34
    lengths = {len(TASK.solution_ids(p)) for p in TASK.sample_train(500, gen)}
    assert min(lengths) >= 23 and max(lengths) <= 34


def test_solutions_round_trip_parse_and_verify(gen):
    problems = TASK.sample_train(200, gen) + list(TASK.held_out[:50])
    responses, references = [], []
    for p in problems:
        prompt, solution = TASK.prompt_ids(p), TASK.solution_ids(p)
        assert len(prompt) == TASK.prompt_len
        assert TASK.tokenizer.encode(TASK.tokenizer.decode(prompt), bos=True) == prompt
        assert TASK.tokenizer.encode(TASK.tokenizer.decode(solution), eos=True) == solution
        columns, boxed = parse_carry_solution(TASK.solution_text(p))
        assert len(columns) == max(len(str(p.a)), len(str(p.b)))
        carry = 0
        for col, (da, db, c, s) in enumerate(columns):
            assert (da, db, c, s) == (p.a // 10**col % 10, p.b // 10**col % 10, carry, da + db + c)
            carry = s // 10
        assert boxed == p.a + p.b
        responses += [solution, TASK.solution_ids(p, style="direct")]
        references += [TASK.answer(p)] * 2
    scores = score_responses(responses, references, decode=TASK.tokenizer.decode,
                             eos_id=TASK.tokenizer.eos_id, reward_fn=boxed_match)
    assert bool(scores.correct.all()) and bool(scores.finished.all())


def test_held_out_split_is_fixed_unique_and_disjoint_from_training(gen):
    assert len(TASK.held_out) == 2000 and len(set(TASK.held_out)) == 2000
    assert ToyArithmetic().held_out == TASK.held_out
    assert ToyArithmetic(ToyArithmeticConfig(split_seed=1)).held_out != TASK.held_out
    assert all(TASK.is_held_out(p) for p in TASK.held_out)
    assert not any(TASK.is_held_out(p) for p in TASK.sample_train(2000, gen))
    # A small world where half the problems are held out: training still never sees one, and
    # sees every other problem.
    small = ToyArithmetic(ToyArithmeticConfig(digits=1, min_operand=0, num_held_out=50))
    train = set(small.sample_train(3000, gen))
    assert train.isdisjoint(small.held_out) and len(train) == 50


def test_generation_is_deterministic(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    a = TASK.sample_train(64, torch.Generator().manual_seed(seed))
    assert a == TASK.sample_train(64, torch.Generator().manual_seed(seed))
    assert TASK.train_problems(7, 16, seed=seed) == TASK.train_problems(7, 16, seed=seed)
    assert TASK.train_problems(7, 16, seed=seed) != TASK.train_problems(8, 16, seed=seed)
    assert TASK.train_problems(7, 16, seed=seed) != TASK.train_problems(7, 16, seed=seed + 1)
    lo, hi = TASK.config.min_operand, TASK.config.max_operand
    assert all(lo <= p.a <= hi and lo <= p.b <= hi for p in a)


@pytest.mark.parametrize("digits", [1, 2, 5])
def test_configurable_digits(digits, gen):
    task = ToyArithmetic(ToyArithmeticConfig(digits=digits, min_operand=0, num_held_out=10))
    for p in task.sample_train(50, gen):
        assert len(task.prompt_ids(p)) == task.prompt_len == 2 * digits + 3
        assert len(task.solution_ids(p)) <= task.max_response_len
        assert parse_carry_solution(task.solution_text(p))[1] == p.a + p.b


@pytest.mark.parametrize("column", [1, 2, 3])
def test_dropped_carry_is_wrong_exactly_on_its_family(column, gen):
    for p in TASK.sample_train(300, gen):
        text = TASK.solution_text(p, drop_carry_into=column)
        columns, boxed = parse_carry_solution(text)
        carried = TASK.carry_into(p, column)
        assert boxed == p.a + p.b - carried * 10**column
        reward = boxed_match(text, TASK.answer(p), metadata={"finished": True})
        assert reward == (0.0 if carried else 1.0)
        # the corrupted trace is self-consistent: carries follow the sums except into `column`
        for col in range(1, len(columns)):
            expected = 0 if col == column else columns[col - 1][3] // 10
            assert columns[col][2] == expected


def test_bad_arguments_fail_with_the_fix():
    with pytest.raises(ValueError, match="num_held_out"):
        ToyArithmeticConfig(digits=1, min_operand=0, num_held_out=51)
    with pytest.raises(ValueError, match="trace_style"):
        ToyArithmeticConfig(trace_style="verbose")
    with pytest.raises(ValueError, match="min_operand"):
        ToyArithmeticConfig(digits=2, min_operand=100)
    with pytest.raises(ValueError, match="outside"):
        TASK.prompt_ids(AdditionProblem(1000, 1))
    with pytest.raises(ValueError, match="drop_carry_into"):
        TASK.solution_text(AdditionProblem(10, 10), drop_carry_into=0)
    with pytest.raises(ValueError, match="trace style"):
        TASK.solution_text(AdditionProblem(10, 10), style="long")


def test_families_are_rules_on_the_prompt():
    from scope_megatron.data import FAMILIES, family
    from scope_megatron.data.toy_arithmetic import AdditionProblem

    odd = family("odd_hundreds_carry")
    assert odd(AdditionProblem(150, 160)) and not odd(AdditionProblem(250, 160))  # 5+6 carries; a's 1 odd / 2 even
    assert not odd(AdditionProblem(110, 120))  # no carry into the hundreds
    world = ToyArithmetic(ToyArithmeticConfig())
    share = sum(odd(p) for p in world.held_out) / len(world.held_out)
    assert 0.15 < share < 0.35, share
    assert set(FAMILIES) >= {"odd_hundreds_carry", "carry_into_hundreds"}
    with pytest.raises(ValueError, match="unknown problem family"):
        family("nope")
