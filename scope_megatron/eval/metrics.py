"""Avg@k and Pass@k from graded samples.

Grades: `correct`, a [P, n] grid (P problems, n samples each, True = the sample is correct) as a
bool (or 0/1 integer) tensor, or nested lists of bools / 0-1 ints with equal row lengths.

  Avg@n    mean accuracy: the fraction of correct samples of each problem, averaged over problems.
  Pass@k   the unbiased estimator of "at least one of k samples is correct" (Chen et al., 2021):
           1 - C(n-c, k) / C(n, k) per problem with c correct of n, averaged over problems.
  best@k   the bootstrap of the paper's reference code (verl's process_validation_metrics): for
           each problem, n_bootstrap subsets of k sample indices drawn WITH replacement from the
           n samples, best@k = the mean over subsets of max(correct in subset); every problem
           uses the same index draws (the reference re-seeds for each prompt), generated exactly
           as the reference does (numpy RandomState(seed), default seed 42, 1000 subsets).
           It reads lower than Pass@k: a subset with repeats holds fewer distinct samples, so
           its expectation is 1 - (1 - c/n)^k <= 1 - C(n-c, k)/C(n, k) (e.g. n = k = 32,
           c = 1: 0.64 against 1.0). Offered so numbers can be compared with the paper's code.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

Grades = Union[torch.Tensor, Sequence[Sequence[Union[bool, int]]]]

# Problems per chunk of the bootstrap (bounds its [chunk, n_bootstrap, k] index gather).
_BOOTSTRAP_CHUNK = 64


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k).

    Exact integer binomials, one correctly rounded division: no cancellation for any n."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"pass_at_k: {name} must be an integer, got {v!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 samples and 0 <= c <= n correct, got n={n}, "
                         f"c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={n}]; Pass@k needs at least k "
                         "samples per problem (sample more, or lower k)")
    if n - c < k:
        return 1.0
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total


def as_grades(correct: Grades) -> torch.Tensor:
    """The grades as a [P, n] bool CPU tensor; raises ValueError for a ragged, empty, non-2-D or
    non-binary input."""
    if not isinstance(correct, torch.Tensor):
        try:
            correct = torch.tensor(correct)
        except (TypeError, ValueError) as e:
            raise ValueError(f"grades must be a [problems, samples] grid of bools with the same "
                             f"number of samples per problem ({e})") from None
    if correct.dim() != 2 or correct.numel() == 0:
        raise ValueError(f"grades must be a non-empty [problems, samples] grid, got shape "
                         f"{tuple(correct.shape)}")
    if correct.dtype != torch.bool:
        if correct.is_complex() or not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("grades must be bools or 0/1 values (True = correct sample)")
        correct = correct != 0
    return correct.cpu()


def avg_at_k_per_problem(correct: Grades) -> torch.Tensor:
    """[P] float64: the fraction of each problem's n samples that are correct."""
    return as_grades(correct).double().mean(dim=1)


def avg_at_k(correct: Grades) -> float:
    """Avg@n: mean accuracy over all problems and samples."""
    return float(avg_at_k_per_problem(correct).mean())


def pass_at_k_per_problem(correct: Grades, k: int) -> torch.Tensor:
    """[P] float64: the unbiased Pass@k of each problem."""
    grades = as_grades(correct)
    n = grades.shape[1]
    return torch.tensor([pass_at_k(n, c, k) for c in grades.sum(dim=1).tolist()],
                        dtype=torch.float64)


def bootstrap_best_at_k_per_problem(correct: Grades, k: int, *, n_bootstrap: int = 1000,
                                    seed: int = 42) -> torch.Tensor:
    """[P] float64: the reference code's bootstrap best@k of each problem (module docstring)."""
    grades = as_grades(correct).numpy()
    n = grades.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"best@k: k={k} must be in [1, n={n}]")
    if n_bootstrap < 1:
        raise ValueError(f"best@k: n_bootstrap must be >= 1, got {n_bootstrap}")
    # Same stream as the reference's np.random.seed(seed) + n_bootstrap np.random.choice calls.
    subsets = np.random.RandomState(seed).randint(0, n, size=(n_bootstrap, k))
    out = np.empty(grades.shape[0])
    for start in range(0, grades.shape[0], _BOOTSTRAP_CHUNK):
        chunk = grades[start:start + _BOOTSTRAP_CHUNK]
        out[start:start + len(chunk)] = chunk[:, subsets].max(axis=-1).mean(axis=-1)
    return torch.from_numpy(out)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n (the reference code's sizes)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(correct: Grades, ks: Optional[Sequence[int]] = None, *, bootstrap: bool = False,
              n_bootstrap: int = 1000, seed: int = 42) -> dict[str, Union[int, float]]:
    """Aggregate metrics of a [P, n] grade grid:
    {"num_problems": P, "num_samples": n, "Avg@n": ..., "Pass@k": ... for k in ks} and, with
    bootstrap=True, "best@k" for k in ks. ks: default default_ks(n); each in [1, n]."""
    grades = as_grades(correct)
    p, n = grades.shape
    ks = default_ks(n) if ks is None else sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(f"summarize: ks {bad or list(ks)} must be a non-empty list within "
                         f"[1, {n}] (n = samples per problem)")
    out: dict[str, Union[int, float]] = {"num_problems": p, "num_samples": n,
                                         f"Avg@{n}": avg_at_k(grades)}
    for k in ks:
        out[f"Pass@{k}"] = float(pass_at_k_per_problem(grades, k).mean())
    if bootstrap:
        for k in ks:
            out[f"best@{k}"] = float(bootstrap_best_at_k_per_problem(
                grades, k, n_bootstrap=n_bootstrap, seed=seed).mean())
    return out
