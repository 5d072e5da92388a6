"""The unbiased pass@k estimator against its binomial formula and a brute-force count of k-subsets."""

import itertools
import math

import numpy as np
import pytest

from tsched.eval import markdown, pass_at_k, pooled


def numpy_pass_at_k(n, c, k):
    """Chen et al. (2021), as the formula: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_pass_at_k_matches_the_binomial_formula_and_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            got = pass_at_k(n, c, k)
            assert got == pytest.approx(numpy_pass_at_k(n, c, k), abs=1e-12)
            if n <= 8:  # the fraction of k-subsets of the n samples holding at least one correct one
                samples = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(samples, k))
                assert got == pytest.approx(np.mean([any(s) for s in subsets]), abs=1e-12)


def test_pass_at_k_edges_and_large_n_stay_finite():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(1000, 3, 100) == pytest.approx(numpy_pass_at_k(1000, 3, 100), rel=1e-9)  # C(1000, 100) ~ 1e139
    with pytest.raises(ValueError, match="at least"):
        pass_at_k(2, 1, 4)


def test_pooled_and_markdown():
    r = lambda acc, n: {"greedy": {"accuracy": acc, "problems": n, "per_family": {"x": acc}},
                        "sampled": {"accuracy": acc, "problems": n, "samples_per_problem": 4, "per_family": {"x": acc},
                                    "pass_at_k": {"1": acc, "4": 1.0}, "mean_length": 3.0, "truncated": 0.5}}
    per_set = {"a": r(0.5, 10), "b": r(1.0, 30)}
    assert pooled(per_set)["sampled"]["accuracy"] == pytest.approx(0.875)
    table = markdown(per_set)
    assert "| set | problems | greedy | avg@4 | pass@1 | pass@4 | mean length | truncated |" in table
    assert "| b | 30 | 1.000 | 1.000 | 1.000 | 1.000 | 3.0 | 0.500 |" in table
