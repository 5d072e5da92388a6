import numpy as np
import pytest

from tsched.rl import advantages


def ref(rewards, G, estimator):
    s = np.asarray(rewards, np.float64).reshape(-1, G)
    mean = s.mean(1, keepdims=True)
    if estimator == "grpo":
        out = (s - mean) / (s.std(1, ddof=1, keepdims=True) + 1e-6)
    elif estimator == "drgrpo":
        out = s - mean
    else:  # leave-one-out mean of the others
        out = np.stack([s[:, i] - np.delete(s, i, axis=1).mean(1) for i in range(G)], 1)
    return out.reshape(-1)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_against_numpy(estimator, G):
    rng = np.random.default_rng(G)
    r = rng.integers(0, 2, size=6 * G).astype(np.float32)
    r[:G] = 1.0  # one group with zero variance
    adv, zero_var = advantages.compute(r, G, estimator)
    np.testing.assert_allclose(np.asarray(adv), ref(r, G, estimator), rtol=1e-5, atol=1e-5)
    groups = r.reshape(-1, G)
    assert float(zero_var) == pytest.approx(np.mean([len(set(g)) == 1 for g in groups]))
    assert np.all(np.asarray(adv)[:G] == 0)  # no signal from a group that agrees


def test_grpo_eps_is_added_to_the_std():
    """Partial-credit rewards with a tiny spread: (s - mean) / (std + 1e-6), eps outside the square root
    (sqrt(var + eps) would shrink these advantages by half)."""
    r = np.array([0.0, 1e-3, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5 + 2e-4], np.float32)
    adv, _ = advantages.compute(r, 4, "grpo")
    np.testing.assert_allclose(np.asarray(adv), ref(r, 4, "grpo"), rtol=1e-3)
