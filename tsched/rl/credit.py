"""Credit allocation criteria: which response tokens are optimized, and with how much advantage.

`allocate(strategy, r, advantages, response_mask, entropies, cfg) -> (loss_mask [N, T], token_adv [N, T])`
with r the schedule magnitude (`tsched.rl.schedules`). r = 0 gives plain GRPO for every strategy.
`response_mask` says which tokens are valid; the returned `loss_mask` says which are selected; the
loss normaliser (selected or valid tokens) is chosen in `tsched.rl.losses`, never here. Entropies are
those of the sampling policy and carry no gradient. `cfg` is the `rl.credit` config section.

    uniform        every valid token, sequence advantage broadcast (GRPO)
    tp             trajectory percentile: response of L tokens, the first min(floor(r L), L - 1) are context
    forking        per response the ceil((1 - r) n) highest-entropy valid tokens (ties: earlier token first)
    forking_batch  the ceil((1 - r) n_batch) highest-entropy valid tokens of the whole batch (80/20 paper,
                   2506.01939: batch-level threshold; ties: earlier in row-major order); static baseline r = 0.8
    d3s            per response (or batch: d3s_scope) the ceil((1 - rho r) n) tokens of largest |A| H (D3S
                   token level, 2509.22115; rho = d3s_max_drop)
    entropy_adv    A' = A + r min(alpha sg(H), |A| / kappa) on every valid token (Cheng et al. 2506.14758)
    empg           A_r = A + r (A' - A), A' = g(H_t) A + zeta exp(-k_f Hn_{t+1}) (EMPG, 2509.09265, per token)

Selection criteria (tp, forking, forking_batch, d3s) read r as the sparsity: r = 1 is the sparsest
selection, r = 0 every valid token. Shaping criteria (entropy_adv, empg) read r as the strength of the
shaping: r = 0 is the plain advantage, r = 1 the published formula. The covariance criteria Clip-Cov /
KL-Cov need log-probs and live at the loss level (`tsched.rl.losses`, `rl.loss=clip_cov|kl_cov`).

The paper's fourth strategy, off-policy prefixes, acts on the prompt, not on credit: it is a prompt
transform of the rollout (`tsched.rollout`, `rl.prompt_transform=reference_prefix`), driven by the same r.

Counts use float32 products of r with lengths, as the jitted loss computes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsched.registry import make_registry

CRITERIA, register = make_registry()
D3S_SCOPES = ("response", "batch")  # `rl.credit.d3s_scope`: where d3s ranks |A| H


def _lengths(mask):
    return jnp.sum(mask, axis=-1).astype(jnp.int32)


@register("uniform")
def uniform(r, adv, mask, entropies, cfg):
    return mask, adv[:, None] * mask


@register("tp")
def trajectory_percentile(r, adv, mask, entropies, cfg):
    L = _lengths(mask)
    cut = jnp.minimum(jnp.floor(r * L.astype(jnp.float32)).astype(jnp.int32), L - 1)
    selected = mask & (jnp.arange(mask.shape[1])[None, :] >= cut[:, None])
    return selected, adv[:, None] * selected


def top_k_mask(score, mask, keep):
    """score [R, T], mask [R, T] bool, keep [R] int -> [R, T] bool: per row the `keep` valid tokens of
    highest score; of equal scores the earliest tokens are taken first. keep is clipped to [0, #valid]."""
    # The keep-th highest score of the row is the threshold: tokens above it are selected, and of the
    # tokens equal to it the earliest ones fill the remaining places. One value sort, where ranking by
    # argsort of an argsort cost two key-value sorts.
    neg = jnp.where(mask, -score, jnp.inf)  # ascending order = highest score first, padding last
    threshold = jnp.take_along_axis(jnp.sort(neg, axis=-1), jnp.maximum(keep - 1, 0)[:, None], axis=-1)
    above = neg < threshold
    ties = mask & (neg == threshold)
    room = keep[:, None] - jnp.sum(above, axis=-1, keepdims=True)
    return mask & (keep[:, None] > 0) & (above | (ties & (jnp.cumsum(ties, axis=-1) <= room)))


def batch_top_k_mask(score, mask, keep):
    """score [N, T], mask [N, T] bool, keep int scalar -> [N, T] bool: the `keep` valid tokens of highest
    score in the whole batch; of equal scores the earliest in row-major order first."""
    N, T = mask.shape
    return top_k_mask(score.reshape(1, N * T), mask.reshape(1, N * T), jnp.reshape(keep, (1,))).reshape(N, T)


def keep_count(fraction, n):
    """ceil(fraction * n) clipped to [0, n], in float32 as the loss computes it."""
    return jnp.clip(jnp.ceil(fraction * n.astype(jnp.float32)).astype(jnp.int32), 0, n)


def _batch_top(score, mask, fraction):
    """The ceil(fraction * n) highest scores among the n valid tokens of the batch -> [N, T] bool."""
    return batch_top_k_mask(score, mask, keep_count(fraction, jnp.sum(mask).astype(jnp.int32)))


@register("forking")
def forking(r, adv, mask, entropies, cfg):
    selected = top_k_mask(entropies, mask, keep_count(1.0 - r, _lengths(mask)))
    return selected, adv[:, None] * selected


@register("forking_batch")
def forking_batch(r, adv, mask, entropies, cfg):
    """80/20 forking tokens (Wang et al. 2506.01939) with a batch-level threshold.

    Selects the ceil((1 - r) n) highest-entropy tokens among the n valid tokens of the whole batch (ties:
    earlier in row-major order), so a response may keep none or all of its tokens; token advantage A on
    them. The paper's static setting (top 20% of the batch) is r = 0.8 with `rl.schedule.mode=constant`;
    scheduled, r -> 0 widens to every valid token (GRPO). Under micro-batching the batch is the micro-batch.
    """
    selected = _batch_top(entropies, mask, 1.0 - r)
    return selected, adv[:, None] * selected


@register("d3s")
def d3s(r, adv, mask, entropies, cfg):
    """D3S token-level down-sampling (Wang et al. 2509.22115): keep the tokens of largest |A_t| H_t.

    Per response of n valid tokens keep ceil((1 - r') n) with r' = `d3s_max_drop` * r (default 1, so r' = r
    as in `forking`): the schedule starts aggressive (r' near 1, few tokens) and relaxes to every valid
    token at r = 0 (GRPO). Ties, including all-zero scores of A = 0 responses, take the earlier token. The
    paper's exact down-sampling ratios are not published in what we could read, hence the parameter.
    With tsched's response-level advantages |A_t| is constant within a response, so for A != 0 the
    per-response ranking is that response's entropy ranking (`forking` with r'); `d3s_scope="batch"`
    ranks all valid tokens of the batch together (ties: earlier in row-major order), where |A| decides
    which responses keep tokens and zero-advantage responses keep none while others have tokens left.
    """
    score = jnp.abs(adv)[:, None] * jax.lax.stop_gradient(entropies)
    fraction = 1.0 - cfg.d3s_max_drop * r
    if cfg.d3s_scope == "batch":
        selected = _batch_top(score, mask, fraction)
    else:
        selected = top_k_mask(score, mask, keep_count(fraction, _lengths(mask)))
    return selected, adv[:, None] * selected


@register("entropy_adv")
def entropy_adv(r, adv, mask, entropies, cfg):
    bonus = jnp.minimum(cfg.alpha * jax.lax.stop_gradient(entropies), jnp.abs(adv)[:, None] / cfg.kappa)
    return mask, (adv[:, None] + r * bonus) * mask


@register("empg")
def empg(r, adv, mask, entropies, cfg):
    """Entropy-Modulated Policy Gradients (Liu et al. 2509.09265), applied per token (a step = a token).

    Hn = (H - min H) / (max H - min H + 1e-8) with min / max over the valid tokens of the batch;
    g_t = exp(-k Hn_t) / (mean_valid exp(-k Hn) + 1e-8) (the mean over all valid tokens of the batch);
    A'_t = g_t A + zeta exp(-k_f Hn_{t+1}), the bonus 0 on the last valid token of a response (no next
    token). Defaults k = k_f = 1, zeta = 0.1 (`empg_k`, `empg_k_f`, `empg_zeta`); the 1e-8 are those of
    the published pseudocode. Scheduled (tsched): A_r = A + r (A' - A), so r = 1 is EMPG and r = 0 plain
    GRPO. Unlike entropy_adv the bonus is not bounded by |A|: a zero-advantage response gets A' = zeta f.
    Every valid token is selected. Under micro-batching the batch statistics are the micro-batch's.
    """
    h = jax.lax.stop_gradient(entropies)
    n = jnp.maximum(jnp.sum(mask), 1)
    h_min = jnp.min(jnp.where(mask, h, jnp.inf))
    h_max = jnp.max(jnp.where(mask, h, -jnp.inf))
    # where() rather than a product: with no valid token h_min is inf and the product would give nan.
    h_norm = jnp.where(mask, (h - h_min) / (h_max - h_min + 1e-8), 0.0)
    scale = jnp.where(mask, jnp.exp(-cfg.empg_k * h_norm), 0.0)
    g = scale / (jnp.sum(scale) / n + 1e-8)
    next_valid = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    bonus = jnp.where(next_valid, jnp.exp(-cfg.empg_k_f * jnp.pad(h_norm[:, 1:], ((0, 0), (0, 1)))), 0.0)
    a = adv[:, None]
    shaped = g * a + cfg.empg_zeta * bonus
    return mask, jnp.where(mask, a + r * (shaped - a), 0.0)


def allocate(strategy: str, r, advantages, response_mask, entropies, cfg):
    """advantages [N], response_mask [N, T] bool, entropies [N, T] -> (loss_mask [N, T] bool, token_adv [N, T])."""
    response_mask = response_mask.astype(bool)
    return CRITERIA[strategy](r, advantages, response_mask, entropies, cfg)
