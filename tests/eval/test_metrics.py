"""Pass@k against exact enumeration, Avg@k on known grades, the bootstrap best@k."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from scope_megatron.eval import (avg_at_k, avg_at_k_per_problem, bootstrap_best_at_k_per_problem,
                                 default_ks, pass_at_k, pass_at_k_per_problem, summarize)


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == float(brute_force_pass_at_k(n, c, k))


def test_pass_at_k_is_exact_at_large_n():
    # 1 - C(n-c, k)/C(n, k) computed naively in floats loses everything here.
    for n, c, k in [(10_000, 1, 1), (2_000, 3, 1_000), (5_000, 1, 2), (1_000, 999, 1_000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == float(exact)
    assert pass_at_k(10_000, 1, 1) == 1e-4
    assert pass_at_k(np.int64(4), np.int64(1), 2) == 0.5


@pytest.mark.parametrize("args, error, message", [
    ((4, 1, 5), ValueError, r"k=5 must be in \[1, n=4\]"),
    ((4, 1, 0), ValueError, "k=0"),
    ((4, 5, 1), ValueError, "0 <= c <= n"),
    ((0, 0, 1), ValueError, "n >= 1"),
    ((4.0, 1, 1), TypeError, "n must be an integer"),
    ((4, True, 1), TypeError, "c must be an integer"),
])
def test_pass_at_k_checks(args, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(*args)


def test_avg_and_pass_on_known_grades():
    grades = [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert avg_at_k_per_problem(grades).tolist() == [1.0, 0.25, 0.0]
    assert avg_at_k(grades) == pytest.approx(1.25 / 3)
    assert pass_at_k_per_problem(grades, 2).tolist() == [1.0, 0.5, 0.0]
    summary = summarize(torch.tensor(grades, dtype=torch.bool))
    assert summary == {"num_problems": 3, "num_samples": 4, "Avg@4": pytest.approx(1.25 / 3),
                       "Pass@1": pytest.approx(1.25 / 3), "Pass@2": pytest.approx(1.5 / 3),
                       "Pass@4": pytest.approx(2 / 3)}


def test_summary_on_random_grades(gen):
    grades = torch.rand(40, 16, generator=gen) < torch.rand(40, 1, generator=gen)
    summary = summarize(grades, ks=[16, 1, 3])
    assert [k for k in summary if k.startswith("Pass@")] == ["Pass@1", "Pass@3", "Pass@16"]
    assert summary["Avg@16"] == pytest.approx(grades.double().mean().item())
    assert summary["Pass@1"] == pytest.approx(summary["Avg@16"])   # Pass@1 is mean accuracy
    assert summary["Pass@16"] == pytest.approx(grades.any(1).double().mean().item())
    assert summary["Pass@1"] <= summary["Pass@3"] <= summary["Pass@16"]


def test_bad_grades_are_refused():
    for bad, message in [([[1, 0], [1]], "same number of samples"), ([1, 0], "grid"),
                         ([[0.5, 1]], "0/1"), ([[]], "non-empty"), (torch.zeros(2, 0), "non-empty")]:
        with pytest.raises(ValueError, match=message):
            avg_at_k(bad)
    with pytest.raises(ValueError, match=r"within \[1, 4\]"):
        summarize([[1, 0, 0, 1]], ks=[8])


def reference_code_best_at_k(values, k, n_bootstrap, seed):
    """verl's bootstrap_metric(values, k, [np.max]) as in the paper's reference code."""
    np.random.seed(seed)
    best = []
    for _ in range(n_bootstrap):
        idx = np.random.choice(len(values), size=k, replace=True)
        best.append(np.max([values[i] for i in idx]))
    return np.mean(best)


def test_bootstrap_reproduces_the_reference_code(gen):
    grades = torch.rand(5, 8, generator=gen) < 0.3
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ours = bootstrap_best_at_k_per_problem(grades, 4, n_bootstrap=200, seed=seed)
    for row, value in zip(grades.int().tolist(), ours.tolist()):
        assert value == reference_code_best_at_k(row, 4, 200, seed)


def test_bootstrap_is_seeded_and_reads_lower(gen):
    grades = torch.rand(300, 8, generator=gen) < torch.rand(300, 1, generator=gen)
    a = bootstrap_best_at_k_per_problem(grades, 8, seed=1)
    assert torch.equal(a, bootstrap_best_at_k_per_problem(grades, 8, seed=1))
    assert not torch.equal(a, bootstrap_best_at_k_per_problem(grades, 8, seed=2))
    c = grades.sum(1).double()
    expected = 1 - (1 - c / 8) ** 8        # with-replacement expectation
    assert (a - expected).abs().max() < 0.08   # 1000 subsets: sd <= 0.016 per problem
    assert a.mean() < pass_at_k_per_problem(grades, 8).mean()
    summary = summarize(grades, ks=[8], bootstrap=True, seed=1)
    assert summary["best@8"] == pytest.approx(a.mean().item())
    assert summary["best@8"] < summary["Pass@8"]


def test_default_ks():
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(12) == [1, 2, 4, 8, 12]
