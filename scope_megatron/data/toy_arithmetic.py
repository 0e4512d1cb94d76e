r"""The embedded default's world: multi-digit addition with a per-column carry trace and a boxed
answer, on an 18-token character-level vocabulary.

Format (digits = 3, the default; ids below):
  prompt    "<bos> 23+ 58="   operands right-aligned to `digits` characters, so every prompt has
                              the same length 2*digits + 3 (9 tokens): no padding inside a batch
  response  "3+8+0=11 2+5+1=08 \boxed{81}<eos>"   (trace_style "carry")
            one "x+y+c=ss" line per column, least significant first, columns = digits of the longer
            operand; c is the carry into the column, ss the two-digit column sum (tens digit = carry
            out). The answer is a + b without leading zeros. 23..34 tokens for 2..3-digit operands.
  response  "\boxed{81}<eos>"  (trace_style "direct": the answer without reasoning)

Vocabulary (TOY_TOKENIZER, deterministic ids, vocab_size 18):
   0 <pad>   1 <bos>   2 <eos>   3..12 '0'..'9'   13 '+'   14 '='   15 ' '   16 '\boxed{'   17 '}'
`\boxed{` is a single token: the answer wrapper costs 2 tokens instead of 8, so per-token means
(perplexity, KL) are not diluted by boilerplate; decoded text is ordinary LaTeX for the verifier.

Splits: a fixed held-out set of `num_held_out` problems drawn with `split_seed`; training problems
are drawn uniformly from the rest (a held-out problem is never sampled for training). A problem is
the ordered pair (a, b): 23+58 and 58+23 are different prompts.

Hooks for worlds where SCOPE's mechanisms matter (issue 7): `trace_style` (two valid formats of
very different length) and `solution_ids(..., drop_carry_into=c)`, the solution of a writer that
ignores the carry into column c — a systematically wrong, self-consistent teacher on the family
of problems with `carry_into(problem, c) == 1`, correct elsewhere.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from .tokenizer import CharTokenizer

BOXED = "\\boxed{"
TOY_SYMBOLS = tuple("0123456789") + ("+", "=", " ", BOXED, "}")
TOY_TOKENIZER = CharTokenizer(TOY_SYMBOLS)
TRACE_STYLES = ("carry", "direct")


@dataclass(frozen=True, order=True)
class AdditionProblem:
    """a + b with non-negative integer operands."""

    a: int
    b: int


@dataclass(frozen=True)
class ToyArithmeticConfig:
    """The toy world's definition; every default is the embedded default's.

    digits: operand width in decimal digits (operands range over [min_operand, 10**digits - 1]).
    min_operand: smallest operand (10: every problem has at least two columns).
    num_held_out: size of the fixed held-out split (at most half of all problems).
    split_seed: seed that draws the held-out split.
    trace_style: default response format, "carry" (column trace + answer) or "direct" (answer).
    """

    digits: int = 3
    min_operand: int = 10
    num_held_out: int = 2000
    split_seed: int = 0
    trace_style: str = "carry"

    def __post_init__(self):
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 18:
            raise ValueError(f"ToyArithmeticConfig.digits must be an integer in [1, 18], got "
                             f"{self.digits!r}")
        top = 10**self.digits - 1
        if not isinstance(self.min_operand, int) or not 0 <= self.min_operand <= top:
            raise ValueError(f"ToyArithmeticConfig.min_operand must be in [0, {top}] for "
                             f"digits={self.digits}, got {self.min_operand!r}")
        total = (top - self.min_operand + 1) ** 2
        if not isinstance(self.num_held_out, int) or not 0 <= self.num_held_out <= total // 2:
            raise ValueError(f"ToyArithmeticConfig.num_held_out must be in [0, {total // 2}] (half "
                             f"of the {total} problems, so training keeps the rest), got "
                             f"{self.num_held_out!r}; lower it or raise digits")
        if self.trace_style not in TRACE_STYLES:
            raise ValueError(f"ToyArithmeticConfig.trace_style must be one of {TRACE_STYLES}, got "
                             f"{self.trace_style!r}")

    @property
    def max_operand(self) -> int:
        return 10**self.digits - 1

    @property
    def num_problems(self) -> int:
        return (self.max_operand - self.min_operand + 1) ** 2


def _columns(p: AdditionProblem) -> int:
    return max(len(str(p.a)), len(str(p.b)))


def _column_sums(p: AdditionProblem,
                 drop_carry_into: Optional[int]) -> list[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, column sum) per column, least significant first, plus a
    final (0, 0, carry, carry) entry for the carry out of the top column."""
    rows, carry = [], 0
    for col in range(_columns(p) + 1):
        if col == drop_carry_into:
            carry = 0
        da, db = (p.a // 10**col) % 10, (p.b // 10**col) % 10
        s = da + db + carry
        rows.append((da, db, carry, s))
        carry = s // 10
    return rows


def _odd_hundreds_carry(p: AdditionProblem) -> bool:
    return (p.a // 100) % 2 == 1 and ToyArithmetic.carry_into(p, 2) == 1


# Named families of problems: evaluation breakdowns, and blind spots of a deliberately wrong
# teacher (tools/make_toy_checkpoints.py --teacher-blind-spot). A family is a rule a model can
# read off the prompt, so a teacher trained to get it wrong is confidently wrong there.
FAMILIES = {
    # the carry into the hundreds column when a's hundreds digit is odd (about 1 problem in 4)
    "odd_hundreds_carry": _odd_hundreds_carry,
    "carry_into_hundreds": lambda p: ToyArithmetic.carry_into(p, 2) == 1,
}
# The column whose carry a blind-spot teacher drops, per family.
BLIND_SPOT_COLUMN = {"odd_hundreds_carry": 2, "carry_into_hundreds": 2}


def family(name: str):
    """The predicate AdditionProblem -> bool of a named family (FAMILIES)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown problem family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


class ToyArithmetic:
    """Problems, splits and token ids of the toy addition world (see the module docstring)."""

    def __init__(self, config: ToyArithmeticConfig = ToyArithmeticConfig()):
        self.config = config
        self.tokenizer = TOY_TOKENIZER
        self.held_out: tuple[AdditionProblem, ...] = self._draw_held_out()
        self._held_out_set = frozenset(self.held_out)

    # ---- problems and splits -----------------------------------------------------------------

    def _draw(self, n: int, generator: torch.Generator) -> list[AdditionProblem]:
        lo, hi = self.config.min_operand, self.config.max_operand + 1
        a = torch.randint(lo, hi, (n,), generator=generator, dtype=torch.int64).tolist()
        b = torch.randint(lo, hi, (n,), generator=generator, dtype=torch.int64).tolist()
        return [AdditionProblem(x, y) for x, y in zip(a, b)]

    def _draw_held_out(self) -> tuple[AdditionProblem, ...]:
        gen = torch.Generator().manual_seed(self.config.split_seed)
        chosen: dict[AdditionProblem, None] = {}  # insertion-ordered set
        while len(chosen) < self.config.num_held_out:
            for p in self._draw(self.config.num_held_out, gen):
                chosen.setdefault(p)
                if len(chosen) == self.config.num_held_out:
                    break
        return tuple(chosen)

    def is_held_out(self, problem: AdditionProblem) -> bool:
        return problem in self._held_out_set

    def sample_train(self, n: int, generator: torch.Generator) -> list[AdditionProblem]:
        """n training problems drawn uniformly (with replacement) from the non-held-out problems;
        deterministic given the CPU generator's state."""
        out: list[AdditionProblem] = []
        while len(out) < n:
            drawn = self._draw(n - len(out), generator)
            out.extend(p for p in drawn if p not in self._held_out_set)
        return out

    def train_problems(self, step: int, batch_size: int, *, seed: int) -> list[AdditionProblem]:
        """The training prompts of step `step` of the stream `seed`: a pure function of
        (seed, step), so a resumed run needs no data-loader state, and runs that share a seed
        (e.g. SCOPE vs OPD, paired) see the same prompts."""
        digest = hashlib.sha256(f"toy-arithmetic:{seed}:{step}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return self.sample_train(batch_size, gen)

    # ---- text and ids ------------------------------------------------------------------------

    @property
    def prompt_len(self) -> int:
        """Tokens per prompt, <bos> included (the same for every problem)."""
        return 2 * self.config.digits + 3

    @property
    def max_response_len(self) -> int:
        """Longest response of the default trace style, <eos> included (max_new_tokens)."""
        top = self.config.max_operand
        return len(self.solution_ids(AdditionProblem(top, top)))

    def prompt_text(self, problem: AdditionProblem) -> str:
        d = self.config.digits
        self._check(problem)
        return f"{problem.a:>{d}}+{problem.b:>{d}}="

    def prompt_ids(self, problem: AdditionProblem) -> list[int]:
        """<bos> + the prompt: prompt_len ids."""
        return self.tokenizer.encode(self.prompt_text(problem), bos=True)

    def answer(self, problem: AdditionProblem) -> str:
        """The reference answer, str(a + b)."""
        return str(problem.a + problem.b)

    @staticmethod
    def carry_into(problem: AdditionProblem, column: int) -> int:
        """The true carry (0 or 1) into `column` (0 = units; columns above the top one carry 0)."""
        if column < 1:
            return 0
        low = 10**column
        return int(problem.a % low + problem.b % low >= low)

    def solution_text(self, problem: AdditionProblem, *, style: Optional[str] = None,
                      drop_carry_into: Optional[int] = None) -> str:
        """The response text without <eos>. style: None = the config's trace_style.

        drop_carry_into=c (1 <= c <= digits): the solution of a writer that never carries into
        column c (c = digits drops the final carry, the answer's leading 1): its trace and answer
        are consistent with each other and wrong exactly when carry_into(problem, c) == 1."""
        self._check(problem)
        style = self.config.trace_style if style is None else style
        if style not in TRACE_STYLES:
            raise ValueError(f"unknown trace style {style!r}; choose one of {TRACE_STYLES}")
        if drop_carry_into is not None and not 1 <= drop_carry_into <= self.config.digits:
            raise ValueError(f"drop_carry_into must be a column in [1, {self.config.digits}] "
                             f"(0 = units never receives a carry), got {drop_carry_into!r}")
        rows = _column_sums(problem, drop_carry_into)
        value = sum((s % 10) * 10**col for col, (_, _, _, s) in enumerate(rows))
        boxed = f"{BOXED}{value}}}"
        if style == "direct":
            return boxed
        trace = " ".join(f"{da}+{db}+{c}={s:02d}" for da, db, c, s in rows[:-1])
        return f"{trace} {boxed}"

    def solution_ids(self, problem: AdditionProblem, *, style: Optional[str] = None,
                     drop_carry_into: Optional[int] = None) -> list[int]:
        """Response ids for SFT: the solution text + <eos> (no <bos>; follows prompt_ids)."""
        return self.tokenizer.encode(
            self.solution_text(problem, style=style, drop_carry_into=drop_carry_into), eos=True)

    def _check(self, problem: AdditionProblem) -> None:
        lo, hi = self.config.min_operand, self.config.max_operand
        if not (lo <= problem.a <= hi and lo <= problem.b <= hi):
            raise ValueError(f"{problem} has an operand outside [{lo}, {hi}] "
                             f"(digits={self.config.digits}, min_operand={lo})")
