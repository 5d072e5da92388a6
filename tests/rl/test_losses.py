"""PPO-clip, GSPO, KL and aggregation against NumPy references, including the A < 0 branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched.rl import losses

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def ref_ppo(logp, old, adv, lo, hi, dual):
    ratio = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi))
    if dual:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    return loss


def test_ppo_against_numpy():
    rng = np.random.default_rng(0)
    logp, old = rng.normal(size=(2, 6, 10)).astype(np.float32) * 0.5
    adv = rng.normal(size=(6, 10)).astype(np.float32)
    for dual in (0.0, 3.0):
        got, _ = losses.clipped_objective(logp - old, adv, 0.2, 0.28, dual)
        np.testing.assert_allclose(np.asarray(got), ref_ppo(logp, old, adv, 0.2, 0.28, dual), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio,adv,want,want_clipped", [
    # A > 0: the upper clip 1 + 0.28 binds
    (2.0, 1.0, -1.28, True), (1.1, 1.0, -1.1, False), (0.5, 1.0, -0.5, False),
    # A < 0: the lower clip 1 - 0.2 binds for small ratios (pessimistic bound), large ratios are not clipped
    (0.5, -1.0, 0.8, True), (1.1, -1.0, 1.1, False), (2.0, -1.0, 2.0, False),
    # A < 0 and ratio beyond the dual clip constant 3: the loss is capped at -A * 3
    (5.0, -1.0, 3.0, False), (5.0, -2.0, 6.0, False),
])
def test_clip_branches_by_hand(ratio, adv, want, want_clipped):
    loss, clipped = losses.clipped_objective(jnp.log(jnp.float32(ratio)), jnp.float32(adv), 0.2, 0.28, 3.0)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert bool(clipped) == want_clipped


def test_negative_advantage_gradient_direction():
    # A < 0 and ratio inside the range: the gradient must push logp down (loss increases with logp).
    g = jax.grad(lambda lp: losses.clipped_objective(lp - 0.0, jnp.float32(-1.0), 0.2, 0.28, 3.0)[0])(jnp.float32(0.05))
    assert float(g) > 0
    # A < 0, ratio below 1 - clip_low: clipped, no gradient
    g = jax.grad(lambda lp: losses.clipped_objective(lp - 0.0, jnp.float32(-1.0), 0.2, 0.28, 3.0)[0])(jnp.log(jnp.float32(0.5)))
    assert float(g) == 0.0


def test_gspo_value_and_gradient():
    rng = np.random.default_rng(1)
    logp, old = (rng.normal(size=(2, 4, 7)) * 0.1).astype(np.float32)
    mask = np.arange(7)[None] < np.array([7, 3, 1, 0])[:, None]
    lr = np.asarray(losses.gspo_log_ratio(logp, old, mask, None, None))
    for i in range(4):
        n = mask[i].sum()
        want = (logp[i] - old[i])[mask[i]].sum() / max(n, 1)
        np.testing.assert_allclose(lr[i], want, rtol=1e-5, atol=1e-6)
    w = rng.normal(size=(4, 7)).astype(np.float32)
    g = jax.grad(lambda lp: jnp.sum(losses.gspo_log_ratio(lp, old, mask, None, None) * w))(logp)
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_kl_estimators():
    logp, ref = np.log(np.array([0.2, 0.5, 0.9], np.float32)), np.log(np.array([0.3, 0.5, 0.1], np.float32))
    np.testing.assert_allclose(np.asarray(losses.kl(logp, ref, "k1")), logp - ref, rtol=1e-6)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(np.asarray(losses.kl(logp, ref, "k3")), k3, rtol=1e-5)
    assert np.all(np.asarray(losses.kl(logp, ref, "k3")) >= 0)


def ref_aggregate(loss, lm, nm, mode):
    N, T = loss.shape
    per_seq = [(loss[i] * lm[i]).sum() for i in range(N)]
    counts = [nm[i].sum() for i in range(N)]
    seqs = [i for i in range(N) if counts[i] > 0]
    if mode == "token-mean":
        return sum(per_seq) / sum(counts)
    if mode == "seq-mean-token-sum":
        return sum(per_seq) / len(seqs)
    if mode == "seq-mean-token-mean":
        return sum(per_seq[i] / max(counts[i], 1) for i in range(N)) / len(seqs)
    return sum(per_seq) / (len(seqs) * T)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalizer", ["selected", "valid"])
def test_aggregate_against_numpy(mode, normalizer):
    rng = np.random.default_rng(2)
    loss = rng.normal(size=(5, 8)).astype(np.float32)
    valid = np.arange(8)[None] < np.array([8, 5, 1, 0, 3])[:, None]
    selected = valid & (rng.random((5, 8)) < 0.6)
    nm = selected if normalizer == "selected" else valid
    num, den = losses.aggregate(loss, selected, nm, mode)
    assert float(num) / float(den) == pytest.approx(ref_aggregate(loss, selected, nm, mode), rel=1e-5)


def test_log_ratio_is_clamped_before_exp():
    # A < 0 without dual clip: the unclipped branch -A exp(clamp(30, -20, 20)) = exp(20), finite
    loss, _ = losses.clipped_objective(jnp.float32(30.0), jnp.float32(-1.0), 0.2, 0.28, 0.0)
    assert float(loss) == pytest.approx(float(np.exp(np.float32(20.0))), rel=1e-5)


def test_clip_fraction_metrics_against_numpy():
    """Which clip acts, over the mask tokens: lower (A < 0, r < 1 - lo), upper (A > 0, r > 1 + hi), dual
    (A < 0, r > dual); and the ratio's first two moments."""
    rng = np.random.default_rng(7)
    lr = rng.normal(0, 0.8, (5, 9)).astype(np.float32)
    adv = np.repeat(np.array([[-1.0], [1.0], [0.5], [-0.7], [2.0]], np.float32), 9, 1)
    lr[0, 2] = 1.5  # A < 0 and ratio 4.5: beyond the dual clip
    lr[0, 3] = np.log(0.76)  # A < 0: below 1 - 0.2, not below 1 - 0.28
    lr[1, 0] = np.log(1.25)  # A > 0: above 1 + 0.2, not above 1 + 0.28
    lr[1, 1] = np.log(4.0)  # A > 0 beyond the dual clip constant: no dual clip for A > 0
    mask = np.arange(9)[None] < np.array([9, 4, 0, 7, 2])[:, None]
    sums = losses.clip_sums(jnp.asarray(lr), jnp.asarray(adv), jnp.asarray(mask), 0.2, 0.28, 3.0)
    r = np.exp(lr)
    want = {"clip_low_frac": (adv < 0) & (r < 0.8), "clip_high_frac": (adv > 0) & (r > 1.28),
            "dual_clip_frac": (adv < 0) & (r > 3.0), "ratio_mean": r, "ratio_sq_mean": r * r}
    for k, v in want.items():
        s, n = sums[k]
        assert float(n) == mask.sum()
        assert float(s) == pytest.approx(float((v * mask).sum()), rel=1e-5), k
    assert all(0 < float(sums[k][0]) for k in ("clip_low_frac", "clip_high_frac", "dual_clip_frac"))
    assert "dual_clip_frac" not in losses.clip_sums(jnp.asarray(lr), jnp.asarray(adv), jnp.asarray(mask), 0.2, 0.28, 0.0)
