"""Policy-gradient token losses (PPO-clip, GSPO, trace ratios, Clip-Cov, KL-Cov), KL estimators, aggregation.

`rl.loss` picks the token loss:

    ppo       PPO-clip on the token ratio pi / pi_old
    gspo      PPO-clip on GSPO's sequence ratio (token form)
    trace     PPO-clip on an eligibility-trace ratio (P-trace / S-trace, tsched's formalisation, see
              `trace_log_ratio`; `rl.trace.lam`, `rl.trace.entropy_top`)
    clip_cov  PPO-clip, and a few random tokens of high advantage-logp covariance get no gradient
              (Cui et al. 2505.22617, `rl.credit.clip_cov_*`)
    kl_cov    unclipped -A ratio, and the top-covariance tokens get a |log ratio| penalty (2505.22617,
              `rl.credit.kl_cov_*`)

Each is registered in `TOKEN_LOSSES` with one signature (see the section below). The first three are a
log-ratio function `(logp, old_logp, mask, entropy, cfg) -> log_ratio [N, T]` (cfg: the `rl.trace`
section, read by `trace` only) fed to `clipped_objective`; the covariance losses replace the clipped
objective. All functions take [N, T] arrays.

Aggregation returns (numerator, denominator) with a denominator that does not depend on the parameters,
so gradient accumulation over micro-batches is exact: accumulate gradients of numerators and the
denominators, divide once (peers that normalised per micro-batch silently re-weighted tokens, verl #5625).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.registry import make_registry
from tsched.rl import credit

LOG_RATIO_CLAMP = 20.0
TOKEN_LOSSES, register_loss = make_registry()
KL_ESTIMATORS, register_kl = make_registry()
AGGREGATIONS, register_aggregation = make_registry()


def clipped_objective(log_ratio, adv, clip_low: float, clip_high: float, dual_clip: float):
    """PPO clip with asymmetric range [1 - clip_low, 1 + clip_high] and dual clip for A < 0.

    L = max(-A r, -A clip(r)); for A < 0, L = min(L, -A dual_clip) (dual_clip = 0: off).
    Returns (loss [N, T], clipped [N, T] bool: the clipped branch is the active one).
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss, clipped > unclipped


def ppo_log_ratio(logp, old_logp, mask, entropy, cfg):
    return logp - old_logp


def gspo_log_ratio(logp, old_logp, mask, entropy, cfg):
    """GSPO token form: value log s_i = mean_t(logp - old) over the row, gradient of each token's logp."""
    m = mask.astype(jnp.float32)
    log_s = jnp.sum((logp - old_logp) * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    # The value of every token's ratio is the sequence ratio s_i; the gradient flows through its own logp.
    return logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_s)[:, None]


def decayed_mean(x, sel, lam):
    """x [N, T], sel [N, T] bool, lam in [0, 1] -> (mean [N, T], weight [N, T]) along T.

    mean_t = sum_{k in S, k <= t} lam^c(k, t) x_k / weight_t, weight_t = sum_{k in S, k <= t} lam^c(k, t),
    S = {k: sel_k}, c(k, t) = #{j in S: k < j <= t}: the trace decays once per selected token and passes
    unselected tokens unchanged. mean_t is 0 where weight_t = 0 (no selected token up to t).
    """
    # Linear recurrence y_t = a_t y_{t-1} + b_t (a_t = lam on selected tokens, 1 elsewhere) solved by an
    # associative scan over (a, b) pairs: only products of lam (which underflow to 0) appear, never
    # lam^(-t) as in a cumulative-sum-of-rescaled-terms trick, so long responses stay finite.
    f = sel.astype(x.dtype)
    a = jnp.where(sel, jnp.asarray(lam, x.dtype), 1.0)

    def combine(p, q):
        (a1, n1, d1), (a2, n2, d2) = p, q
        return a1 * a2, a2 * n1 + n2, a2 * d1 + d2

    _, num, den = jax.lax.associative_scan(combine, (a, f * x, f), axis=1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0), den


def trace_log_ratio(logp, old_logp, mask, entropy, cfg):
    """Eligibility-trace log-ratio (P-trace / S-trace): tsched's own formalisation.

    The seed paper (Mou et al. 2605.05965) describes P-trace only as trace-based approximate historical
    importance weights with partial trust-region preservation, S-trace as its sparse form over
    high-entropy tokens, GSPO as the uniform-credit special case; its method section is not available,
    so the following is ours. With d_k = logp_k - old_logp_k and S the trace tokens of a response:

        log w_t = sum_{k in S, k <= t} lam^c(k, t) d_k / sum_{k in S, k <= t} lam^c(k, t)
        c(k, t) = #{j in S: k < j <= t}

    P-trace: S = every token of `mask` (c(k, t) = t - k on a contiguous response). S-trace: S = the
    ceil(entropy_top * n) highest-entropy tokens of each response's n mask tokens (ties: earlier token).
    A token outside S carries the trace value of the last S token before it (the normalised sum is
    unchanged by tokens that add nothing; decaying across them would leave lam = 0 undefined there); a
    token with no S token at or before it has no history and uses its own d_t (token-level PPO).
    `clipped_objective` then clips exp(log w_t) as PPO does. Limits (tested): lam = 0 is token PPO, lam = 1
    over all tokens the running prefix mean, whose last value is GSPO's sequence log-ratio.

    Gradient: GSPO's token form, value log w_t and gradient through the token's own logp only
    (logp_t - sg(logp_t) + sg(log w_t)). Differentiating through the whole trace would hand token k the
    sum of its lam-weights over every later token's loss, a position-dependent reweighting that grows
    with length for lam near 1; the token form keeps each token's gradient A w_t grad logp_t: an
    importance-weighted policy gradient whose weight is the smoothed history ratio, and the clip stops a
    token's update once its history left the trust region (the "partial trust region"). At lam = 1 it is
    GSPO's token form evaluated on prefixes.
    cfg: the `rl.trace` section (lam, entropy_top); logp, old_logp, entropy [N, T], mask [N, T] bool.
    """
    d = jax.lax.stop_gradient(logp - old_logp)
    keep = credit.keep_count(cfg.entropy_top, jnp.sum(mask, -1).astype(jnp.int32))
    sel = credit.top_k_mask(jax.lax.stop_gradient(entropy), mask, keep)
    mean, weight = decayed_mean(d, sel, cfg.lam)
    log_w = jnp.where(weight > 0, mean, d)
    return logp - jax.lax.stop_gradient(logp) + log_w




def covariance(adv, logp, mask):
    """Cov_t = (A_t - mean A)(logp_t - mean logp), means over the mask tokens of the batch; 0 off mask.

    adv, logp [N, T] (token advantages, current log-probs; no gradient), mask [N, T] bool -> [N, T].
    """
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    a, lp = jax.lax.stop_gradient(adv), jax.lax.stop_gradient(logp)
    return (a - jnp.sum(a * m) / n) * (lp - jnp.sum(lp * m) / n) * m


def _count(ratio, mask):
    """max(1, floor(ratio n)) for the n > 0 mask tokens, else 0 (float32 product, as the loss computes it)."""
    n = jnp.sum(mask).astype(jnp.float32)
    return jnp.where(n > 0, jnp.maximum(jnp.floor(ratio * n).astype(jnp.int32), 1), 0)


def clip_cov(logp, old_logp, adv, mask, key, clip_low, clip_high, dual_clip, ratio, lb, ub):
    """Clip-Cov (Cui et al. 2505.22617; verl `compute_policy_loss_clip_cov`).

    PPO-clip loss on the token ratio (`clipped_objective`, dual clip as configured; verl's version has
    none, `rl.dual_clip=0` matches it). Candidates: mask tokens whose clipped branch is not already
    active with lb < Cov_t < ub (`covariance`). max(1, floor(ratio n)) of them (n = mask tokens of the
    batch; all if fewer) are drawn uniformly at random with `key` and get no gradient: their loss is
    zeroed. They still count in the normaliser, as in verl where the loss is multiplied by 0 and the
    aggregation mask is unchanged. Defaults (verl's and the paper's): ratio 2e-4, lb 1, ub 5
    (`rl.credit.clip_cov_ratio`, `clip_cov_lb`, `clip_cov_ub`).
    logp, old_logp, adv [N, T], mask [N, T] bool -> (loss [N, T], clipped [N, T] bool, detached [N, T] bool).
    """
    loss, clipped = clipped_objective(logp - old_logp, adv, clip_low, clip_high, dual_clip)
    cov = covariance(adv, logp, mask)
    candidates = mask & ~clipped & (cov > lb) & (cov < ub)
    # Independent uniform priorities: the top-k of them is a uniformly random k-subset of the candidates.
    priority = jax.random.uniform(key, mask.shape)
    detached = credit.batch_top_k_mask(priority, candidates, _count(ratio, mask))
    return jnp.where(detached, 0.0, loss), clipped, detached


def kl_cov(logp, old_logp, adv, mask, ratio, beta):
    """KL-Cov (Cui et al. 2505.22617; verl `compute_policy_loss_kl_cov`).

    Every token: -A_t r_t, r_t = exp(logp_t - old_logp_t), no clipping (as in verl). The
    max(1, floor(ratio n)) mask tokens of largest Cov_t (`covariance`; ties: earlier in row-major order;
    verl keeps at least one) add beta |logp_t - old_logp_t|, whose gradient sign(logp_t - old_logp_t) is
    0 on-policy (ratio 1): the penalty acts once the policy moved from the sampler's. Defaults: ratio
    2e-4, beta 1 (the paper's docs; verl's dataclass default is 0.1) (`rl.credit.kl_cov_ratio`,
    `kl_cov_beta`).
    logp, old_logp, adv [N, T], mask [N, T] bool -> (loss [N, T], penalised [N, T] bool).
    """
    log_ratio = logp - old_logp
    ratio_t = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    penalised = credit.batch_top_k_mask(covariance(adv, logp, mask), mask, _count(ratio, mask))
    # |x| written as x sg(sign x): the derivative of jnp.abs at 0 is 1, the subgradient sign(0) = 0 is
    # what the reference (torch.abs) uses, and on-policy every log-ratio is exactly 0.
    abs_log_ratio = log_ratio * jax.lax.stop_gradient(jnp.sign(log_ratio))
    return -adv * ratio_t + jnp.where(penalised, beta * abs_log_ratio, 0.0), penalised


# ---- Token losses by name (`rl.loss`): (logp, old_logp, adv, mask, entropy, rl, key) ->
# (loss [N, T], clipped [N, T] bool: the clipped branch is active, extra metric sums {name: (sum, count)}).
# adv are token advantages [N, T], mask the selected tokens, rl the `config.rl` section, key a PRNG key.

def clip_sums(log_ratio, adv, mask, clip_low: float, clip_high: float, dual_clip: float) -> dict:
    """Which clip acts, as metric sums over the mask tokens: the lower clip (A < 0, ratio < 1 - clip_low),
    the upper clip (A > 0, ratio > 1 + clip_high), the dual clip (A < 0, ratio > dual_clip); and the
    ratio's first two moments (its spread)."""
    f32 = lambda x: jnp.sum(x.astype(jnp.float32) * mask)
    ratio = jax.lax.stop_gradient(jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)))
    n = f32(jnp.ones_like(ratio))
    out = {"clip_low_frac": (f32((adv < 0) & (ratio < 1 - clip_low)), n),
           "clip_high_frac": (f32((adv > 0) & (ratio > 1 + clip_high)), n),
           "ratio_mean": (f32(ratio), n), "ratio_sq_mean": (f32(ratio * ratio), n)}
    if dual_clip:
        out["dual_clip_frac"] = (f32((adv < 0) & (ratio > dual_clip)), n)
    return out


def _clipped(log_ratio):
    """The PPO-clipped loss of a log-ratio function (token, sequence or trace ratio)."""
    def loss(logp, old_logp, adv, mask, entropy, rl, key):
        lr = log_ratio(logp, old_logp, mask, entropy, rl.trace)
        sums = clip_sums(lr, adv, mask, rl.clip_low, rl.clip_high, rl.dual_clip)
        return (*clipped_objective(lr, adv, rl.clip_low, rl.clip_high, rl.dual_clip), sums)
    return loss


register_loss("ppo")(_clipped(ppo_log_ratio))
register_loss("gspo")(_clipped(gspo_log_ratio))
register_loss("trace")(_clipped(trace_log_ratio))


def _picked_frac(picked, mask):
    f32 = lambda x: jnp.sum(x.astype(jnp.float32))
    return {"cov_frac": (f32(picked), f32(mask))}


@register_loss("clip_cov")
def clip_cov_loss(logp, old_logp, adv, mask, entropy, rl, key):
    if key is None:
        raise ValueError("rl.loss='clip_cov' draws tokens at random: the loss needs a PRNG key")
    c = rl.credit
    loss, clipped, picked = clip_cov(logp, old_logp, adv, mask, key, rl.clip_low, rl.clip_high, rl.dual_clip,
                                     c.clip_cov_ratio, c.clip_cov_lb, c.clip_cov_ub)
    return loss, clipped, _picked_frac(picked, mask)


@register_loss("kl_cov")
def kl_cov_loss(logp, old_logp, adv, mask, entropy, rl, key):
    loss, picked = kl_cov(logp, old_logp, adv, mask, rl.credit.kl_cov_ratio, rl.credit.kl_cov_beta)
    return loss, jnp.zeros_like(mask), _picked_frac(picked, mask)


@register_kl("k1")
def kl_k1(logp, ref_logp):
    """logp - ref: unbiased, can be negative per token."""
    return logp - ref_logp


@register_kl("k3")
def kl_k3(logp, ref_logp):
    """exp(ref - logp) - (ref - logp) - 1: unbiased and non-negative (Schulman's k3)."""
    d = ref_logp - logp
    return jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - d - 1.0


def kl(logp, ref_logp, estimator: str):
    """Per-token KL(pi || pi_ref) estimate [N, T] by the named estimator."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)


@register_aggregation("token-mean")
def token_mean(seq_sum, n_tokens, horizon):
    """sum(l) / #norm tokens"""
    return jnp.sum(seq_sum), jnp.sum(n_tokens)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(seq_sum, n_tokens, horizon):
    """sum_i sum_t(l) / #seqs"""
    return jnp.sum(seq_sum), _n_seqs(n_tokens)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(seq_sum, n_tokens, horizon):
    """sum_i [sum_t(l) / #norm tokens_i] / #seqs"""
    return jnp.sum(seq_sum / jnp.maximum(n_tokens, 1.0)), _n_seqs(n_tokens)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(seq_sum, n_tokens, horizon):
    """sum_i sum_t(l) / (#seqs * T), T the padded horizon (Dr. GRPO's constant normaliser)"""
    return jnp.sum(seq_sum), _n_seqs(n_tokens) * horizon


def _n_seqs(n_tokens):
    """A sequence counts in seq-mean modes if it has a token to normalise by."""
    return jnp.sum(n_tokens > 0).astype(jnp.float32)


def aggregate(loss, loss_mask, norm_mask, mode: str):
    """(numerator, denominator) of the aggregated loss [N, T] -> scalars; loss = numerator / denominator.

    loss_mask selects the tokens whose loss counts; norm_mask the tokens a mean divides by (the selected
    tokens, or all valid tokens). Modes are the registered `AGGREGATIONS`.
    """
    lm, nm = loss_mask.astype(jnp.float32), norm_mask.astype(jnp.float32)
    return AGGREGATIONS[mode](jnp.sum(loss * lm, -1), jnp.sum(nm, -1), loss.shape[-1])
