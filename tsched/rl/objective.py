"""The scheduled RL objective from per-token quantities: credit criterion, clipped loss, KL, aggregation.

This is where the paper's idea composes: the schedule magnitude r (a traced scalar) goes into the credit
criterion, which picks tokens and shapes advantages; PPO-clip or GSPO gives the token loss; an optional
KL penalty and entropy bonus are added; the aggregation returns (numerator, denominator) so gradient
accumulation stays exact. Pure and jittable; the model forward lives in tsched.train.learner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.model import logits as logits_lib
from tsched.rl import credit, losses

KL_BINS = 10  # trajectory-percentile bins of the KL-to-initial-policy metric
STAGES = {"first10": (0.0, 0.1), "mid45_55": (0.45, 0.55), "last10": (0.9, 1.0)}


# logits [N, T, V], targets [N, T] -> log-prob, entropy [N, T]; the formula lives beside its chunked form.
token_stats_from_logits = logits_lib.stats_from_logits


def stage_masks(mask):
    """Token position as a fraction of its response length [N, T], and masks per trajectory stage."""
    L = jnp.sum(mask, -1, keepdims=True).astype(jnp.float32)
    frac = jnp.arange(mask.shape[1])[None, :] / jnp.maximum(L, 1.0)
    return frac, {k: mask & (frac >= lo) & (frac < hi) for k, (lo, hi) in STAGES.items()}


def policy_loss(rl, r, logp, entropy, adv, mask, ref_logp=None):
    """-> (numerator, denominator, metric sums {name: (sum, count)}).

    rl: the `config.rl` section; r: schedule magnitude; logp, entropy [N, T] (with gradient);
    adv [N]; mask [N, T] valid response tokens; ref_logp [N, T] of the reference policy or None.
    On-policy single update: the sampling policy is the current one, so old log-probs are the
    current ones without gradient (ratio 1 in value) and no separate scoring pass is needed.
    """
    ccfg = rl.credit
    old_logp = jax.lax.stop_gradient(logp)
    ent = jax.lax.stop_gradient(entropy)
    loss_mask, token_adv = credit.allocate(ccfg.strategy, r, adv, mask, ent, ccfg)
    norm_mask = loss_mask if ccfg.normalizer == "selected_tokens" else mask
    log_ratio = losses.LOG_RATIOS[rl.loss](logp, old_logp, loss_mask)
    per_token, clipped = losses.clipped_objective(log_ratio, token_adv, rl.clip_low, rl.clip_high, rl.dual_clip)

    f32 = lambda x: x.astype(jnp.float32)
    frac, stages = stage_masks(mask)
    sums = {
        "tokens_optimized_frac": (jnp.sum(f32(loss_mask)), jnp.sum(f32(mask))),
        "entropy": (jnp.sum(ent * mask), jnp.sum(f32(mask))),
        "clip_frac": (jnp.sum(f32(clipped & loss_mask)), jnp.sum(f32(loss_mask))),
        **{f"entropy_{k}": (jnp.sum(ent * m), jnp.sum(f32(m))) for k, m in stages.items()},
    }
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
