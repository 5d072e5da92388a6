"""The scheduled RL objective from per-token quantities: credit criterion, clipped loss, KL, aggregation.

This is where the paper's idea composes: the schedule magnitude r (a traced scalar) goes into the credit
criterion, which picks tokens and shapes advantages; the `rl.loss` token loss (PPO-clip on the token, GSPO
or trace ratio, or the covariance losses Clip-Cov / KL-Cov, `tsched.rl.losses`) follows; an optional
KL penalty and entropy bonus are added; the aggregation returns (numerator, denominator) so gradient
accumulation stays exact. Pure and jittable; the model forward lives in tsched.train.learner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.registry import make_registry
from tsched.rl import credit, losses

KL_BINS = 10  # trajectory-percentile bins of the KL-to-initial-policy metric
STAGES = {"first10": (0.0, 0.1), "mid45_55": (0.45, 0.55), "last10": (0.9, 1.0)}

# Which tokens a mean divides by (`rl.credit.normalizer`): (selected [N, T], valid [N, T]) -> [N, T].
NORMALIZERS, register_normalizer = make_registry()
register_normalizer("selected_tokens")(lambda selected, valid: selected)  # the RLVR-Schedule code
register_normalizer("valid_tokens")(lambda selected, valid: valid)  # the 80/20 paper, TRL


def uses_batch_statistics(rl) -> bool:
    """Whether the credit criterion or token loss of `rl` reads statistics of the whole (micro-)batch
    (thresholds, min / max, means, top-k over all valid tokens): with gradient accumulation they are the
    micro-batch's, so the number of micro-batches changes what these compute."""
    c = rl.credit
    return (c.strategy in ("forking_batch", "empg") or (c.strategy == "d3s" and c.d3s_scope == "batch")
            or rl.loss in ("clip_cov", "kl_cov"))


def stage_masks(mask):
    """Token position as a fraction of its response length [N, T], and masks per trajectory stage.

    Token t of L sits at the centre of its share of the response, (t + 1/2) / L: with t / L the last
    token of a short response never reached the last stage (L < 10) or the last KL bins.
    """
    L = jnp.sum(mask, -1, keepdims=True).astype(jnp.float32)
    frac = (jnp.arange(mask.shape[1])[None, :] + 0.5) / jnp.maximum(L, 1.0)
    return frac, {k: mask & (frac >= lo) & (frac < hi) for k, (lo, hi) in STAGES.items()}


def policy_loss(rl, r, logp, entropy, adv, mask, ref_logp=None, old_logp=None, key=None, sample_logp=None,
                old_entropy=None):
    """-> (numerator, denominator, metric sums {name: (sum, count)}).

    rl: the `config.rl` section; r: schedule magnitude; logp, entropy [N, T] (with gradient);
    adv [N]; mask [N, T] valid response tokens; ref_logp [N, T] of the reference policy or None.
    old_logp [N, T]: log-probs of the policy that sampled; None = the on-policy single update, where
    the sampling policy is the current one, so old log-probs are the current ones without gradient
    (ratio 1 in value) and no separate scoring pass is needed. That shortcut is right only while the
    sampler and the learner agree on every token's log-prob (same temperature, same positions):
    sample_logp [N, T], the sampler's own log-probs, feeds the `logp_mismatch` metric that checks it.
    key: a PRNG key, for token losses that draw at random (`clip_cov`). old_entropy [N, T]: the sampling
    policy's entropies, which credit criteria read (default: the current ones, equal on-policy).
    """
    ccfg = rl.credit
    old_logp = jax.lax.stop_gradient(logp if old_logp is None else old_logp)
    ent = jax.lax.stop_gradient(entropy if old_entropy is None else old_entropy)
    loss_mask, token_adv = credit.allocate(ccfg.strategy, r, adv, mask, ent, ccfg)
    norm_mask = NORMALIZERS[ccfg.normalizer](loss_mask, mask)
    per_token, clipped, loss_sums = losses.TOKEN_LOSSES[rl.loss](logp, old_logp, token_adv, loss_mask, ent, rl, key)

    f32 = lambda x: x.astype(jnp.float32)
    frac, stages = stage_masks(mask)
    sums = {
        "tokens_optimized_frac": (jnp.sum(f32(loss_mask)), jnp.sum(f32(mask))),
        "entropy": (jnp.sum(ent * mask), jnp.sum(f32(mask))),
        "clip_frac": (jnp.sum(f32(clipped & loss_mask)), jnp.sum(f32(loss_mask))),
        **{f"entropy_{k}": (jnp.sum(ent * m), jnp.sum(f32(m))) for k, m in stages.items()},
        **loss_sums,
    }
    if sample_logp is not None:
        gap = jnp.abs(jax.lax.stop_gradient(logp) - sample_logp)
        sums["logp_mismatch"] = (jnp.sum(gap * mask), jnp.sum(f32(mask)))
    # KL(old || new) by the k3 estimator on the sampled tokens: how far the updates moved the policy.
    policy_kl = losses.kl(old_logp, jax.lax.stop_gradient(logp), "k3")
    sums["policy_kl"] = (jnp.sum(policy_kl * mask), jnp.sum(f32(mask)))
    if ref_logp is not None:
        kl_tok = losses.kl(logp, jax.lax.stop_gradient(ref_logp), rl.kl_estimator)
        if rl.kl_coef:
            per_token = per_token + rl.kl_coef * kl_tok
        bins = jnp.clip((frac * KL_BINS).astype(jnp.int32), 0, KL_BINS - 1)
        onehot = jax.nn.one_hot(bins, KL_BINS) * mask[..., None]
        sums["kl_bins"] = (jnp.einsum("ntb,nt->b", onehot, jax.lax.stop_gradient(kl_tok)), onehot.sum((0, 1)))
    if rl.entropy_coef:
        per_token = per_token - rl.entropy_coef * entropy
    num, den = losses.aggregate(per_token, loss_mask, norm_mask, rl.aggregation)
    return num, den, sums
