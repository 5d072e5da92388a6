"""The jitted RL update: exact gradient accumulation, one compilation, and the loss on a NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny import set_field
from tsched import model
from tsched.config import base_config
from tsched.rl import objective
from tsched.sampling.sampler import SamplingConfig, sample
from tsched.train import learner

B, G, P, T = 2, 4, 6, 10
SLOW = pytest.mark.slow  # more cases of a test whose first case runs in the fast set


def make_cfg(**rl):
    cfg = base_config()
    cfg.rl.group_size = G
    cfg.rl.prompts_per_step = B
    cfg.rl.steps = 10
    for k, v in rl.items():
        set_field(cfg.rl, k, v)
    return cfg


def batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(1, P + 1, B)
    prompts = np.where(np.arange(P)[None] >= P - prompt_lens[:, None], rng.integers(4, vocab, (B, P)), 0)
    lengths = rng.integers(1, T + 1, B * G)
    lengths[0] = 1
    completions = np.where(np.arange(T)[None] < lengths[:, None], rng.integers(4, vocab, (B * G, T)), 0)
    rewards = rng.integers(0, 2, B * G).astype(np.float32)
    rewards[:G] = [1, 0, 0, 1]
    return {k: jnp.asarray(x, dtype) for k, x, dtype in (
        ("prompts", prompts, jnp.int32), ("prompt_lens", prompt_lens, jnp.int32),
        ("completions", completions, jnp.int32), ("lengths", lengths, jnp.int32), ("rewards", rewards, jnp.float32))}


def np_grpo(rewards):
    """GRPO advantages [N] from the formula: (s - mean_g) / (std_g + 1e-6), unbiased std over each group."""
    s = np.asarray(rewards, np.float64).reshape(-1, G)
    return ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1).astype(np.float32)


def sampling_policy_rows(mcfg, params, data):
    """(prompt, rows) of an update against the policy that sampled: old log-probs and entropies from
    `params`, by one pass over each row joined to its prompt."""
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    old_logp, old_ent = learner.token_stats(mcfg, params, tokens, valid, P, 1.0)
    prompt, rows = learner.split_batch(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    return prompt, {**rows, "adv": jnp.asarray(np_grpo(data["rewards"])), "old_logp": old_logp, "old_entropy": old_ent}


def run_step(cfg, mcfg, params, data, with_ref=True, ref_params=None):
    # Plain SGD: parameter changes are the gradients themselves (Adam's first step is lr * sign(g),
    # which turns float rounding in near-zero gradients into full-size differences).
    tx = optax.sgd(1.0)
    state = learner.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(0))
    step = learner.make_rl_step(cfg, mcfg, tx)
    ref = (params if ref_params is None else ref_params) if with_ref else None
    return step(state, ref, data)


@pytest.mark.parametrize("mode,strategy,normalizer", [
    ("token-mean", "tp", "selected_tokens"), ("seq-mean-token-mean", "entropy_adv", "selected_tokens"),
    ("seq-mean-token-sum-norm", "forking", "selected_tokens"),
    pytest.param("seq-mean-token-sum", "forking", "valid_tokens", marks=SLOW),
])
def test_gradient_accumulation_equals_full_batch(tiny_model_cfg, tiny_params, mode, strategy, normalizer):
    data = batch(tiny_model_cfg.vocab_size)
    updates, metrics = [], []
    for micro in (1, 4):
        cfg = make_cfg(micro_batches=micro, aggregation=mode, **{"credit.strategy": strategy,
                                                                "credit.normalizer": normalizer})
        state, m = run_step(cfg, tiny_model_cfg, tiny_params, data)
        updates.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state["params"], tiny_params))
        metrics.append(m)
    assert float(metrics[0]["grad_norm"]) > 0
    assert float(metrics[1]["loss"]) == pytest.approx(float(metrics[0]["loss"]), rel=1e-5, abs=1e-7)
    assert float(metrics[1]["grad_norm"]) == pytest.approx(float(metrics[0]["grad_norm"]), rel=1e-5)
    # SGD with lr 1: the updates are the gradients; equal up to float32 summation order
    scale = max(np.abs(u).max() for u in jax.tree.leaves(updates[0]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), *updates)


def sft_batch(vocab, seed=0):
    """(prompts [4B, P] left-padded, prompt_lens, targets [4B, T] right-padded, target_lens): lengths from 1 to T."""
    rng = np.random.default_rng(seed)
    n = 4 * B
    prompt_lens, target_lens = rng.integers(1, P + 1, n), rng.integers(1, T + 1, n)
    target_lens[:2] = 1, T
    prompts = np.where(np.arange(P)[None] >= P - prompt_lens[:, None], rng.integers(4, vocab, (n, P)), 0)
    targets = np.where(np.arange(T)[None] < target_lens[:, None], rng.integers(4, vocab, (n, T)), 0)
    return tuple(jnp.asarray(x, jnp.int32) for x in (prompts, prompt_lens, targets, target_lens))


@pytest.mark.parametrize("micro,buckets", [(4, 1), (8, 3)])
def test_sft_micro_batches_give_the_one_pass_step(tiny_model_cfg, tiny_params, micro, buckets):
    """The SFT loss on a NumPy reference (token-mean negative log-likelihood of the targets, from the logits
    of each row joined to its prompt), and the micro-batched, length-bucketed step's loss and SGD update
    equal to the one-pass step's."""
    data = sft_batch(tiny_model_cfg.vocab_size, seed=5)
    prompts, prompt_lens, targets, target_lens = map(np.asarray, data)
    tx = optax.sgd(1.0)
    outs = [learner.make_sft_step(tiny_model_cfg, tx, None, m, b)(
        learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx), *data) for m, b in ((1, 1), (micro, buckets))]
    (s0, m0), (s1, m1) = outs
    nll = count = 0.0
    for i in range(len(prompts)):
        row = np.concatenate([prompts[i, P - prompt_lens[i]:], targets[i, :target_lens[i]]])
        logits = np.asarray(model.forward(tiny_model_cfg, tiny_params, jnp.asarray(row[None])), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        start = prompt_lens[i] - 1  # the last prompt token predicts the first target
        nll -= logp[np.arange(start, start + target_lens[i]), row[start + 1:]].sum()
        count += target_lens[i]
    assert float(m0["sft_loss"]) == pytest.approx(nll / count, rel=1e-5)
    assert float(m1["sft_loss"]) == pytest.approx(float(m0["sft_loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m0["grad_norm"]), rel=1e-5)
    scale = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(tiny_params)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale),
                 s1["params"], s0["params"])


def test_auto_slices_keep_1024_tokens_and_batch_statistics_whole():
    # the default experiment: SFT 64 rows x (32 + 112) tokens, RL 128 rows x 112 response positions
    assert learner.auto_slices(64, 144) == 8 and learner.auto_slices(128, 112) == 8
    assert learner.auto_slices(96, 112) == 8  # 12 rows (1,344 tokens); 12 slices would leave 896 each
    assert learner.auto_slices(16, 60) == 1 and learner.auto_slices(1, 4096) == 1
    # rows sharded over devices: every slice splits evenly over them
    assert learner.auto_slices(128, 112, row_shards=32) == 4 and learner.auto_slices(64, 144, row_shards=16) == 4
    assert learner.auto_slices(24, 1024, row_shards=16) == 1  # no count splits evenly: one slice
    rl = base_config().rl
    assert (rl.micro_batches, learner.rl_slices(rl, 128, 112)) == (0, 8)
    for field, value in (("credit.strategy", "forking_batch"), ("credit.strategy", "empg"), ("loss", "clip_cov"),
                         ("loss", "kl_cov")):
        cfg = make_cfg(**{field: value})
        assert learner.rl_slices(cfg.rl, 128, 112) == 1, value
    d3s = make_cfg(**{"credit.strategy": "d3s"})
    assert learner.rl_slices(d3s.rl, 128, 112) == 8
    d3s.rl.credit.d3s_scope = "batch"
    assert learner.rl_slices(d3s.rl, 128, 112) == 1
    explicit = make_cfg(micro_batches=4, loss="clip_cov")
    assert learner.rl_slices(explicit.rl, 128, 112) == 4  # an explicit count is kept, batch statistics or not


def test_rl_warmup_raises_the_rate_linearly_then_holds_it():
    """A constant gradient: Adam's bias-corrected update is then lr_k * sign(g) (up to eps), with
    lr_k = lr * min(k / warmup, 1) at optimizer step k = 0, 1, ... (optax counts from 0)."""
    lr, warmup = 1e-3, 4
    tx = learner.make_optimizer(lr, 1e9, warmup)
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    opt_state = tx.init(jax.tree.map(jnp.zeros_like, g))
    for k in range(7):
        updates, opt_state = tx.update(g, opt_state, g)
        want = -lr * min(k / warmup, 1.0) * np.sign(np.asarray(g["w"]))
        np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5, atol=1e-12)


def test_compiles_once_across_steps(tiny_model_cfg, tiny_params):
    cfg = make_cfg()
    tx = learner.make_optimizer(1e-3, 1.0)
    state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
    step = learner.make_rl_step(cfg, tiny_model_cfg, tx)
    mags = []
    for i in range(4):
        state, m = step(state, tiny_params, batch(tiny_model_cfg.vocab_size, seed=i))
        mags.append(float(m["magnitude"]))
    assert step._cache_size() == 1
    assert int(state["step"]) == 4
    # linear schedule over 8 of 10 steps, step counter from 1
    np.testing.assert_allclose(mags, [0.99 * (1 - s / 8) for s in (1, 2, 3, 4)], rtol=1e-6)


def test_loss_matches_numpy_reference(tiny_model_cfg, tiny_params):
    """Loss value for TP at step 1 recomputed on the host from logits, the formulas and the masks."""
    cfg = make_cfg(**{"credit.strategy": "tp"})
    data = batch(tiny_model_cfg.vocab_size, seed=3)
    _, m = run_step(cfg, tiny_model_cfg, tiny_params, data, with_ref=False)
    lens, rewards = np.asarray(data["lengths"]), np.asarray(data["rewards"])
    r = np.float32(0.99 * (1 - 1 / 8))
    adv = np_grpo(rewards)
    # at the first update the ratio is 1, so the clipped loss of each selected token is -A
    num = den = 0.0
    for i in range(B * G):
        L = lens[i]
        cut = min(int(np.floor(r * np.float32(L))), L - 1)
        num += -adv[i] * (L - cut)
        den += L - cut
    assert float(m["loss"]) == pytest.approx(num / den, rel=1e-5, abs=1e-6)
    assert float(m["tokens_optimized_frac"]) == pytest.approx(den / lens.sum(), rel=1e-6)
    assert float(m["magnitude"]) == pytest.approx(r)


def test_zero_magnitude_is_grpo(tiny_model_cfg, tiny_params):
    data = batch(tiny_model_cfg.vocab_size, seed=5)
    out = {}
    for strategy in ("uniform", "tp", "forking", "entropy_adv"):
        cfg = make_cfg(**{"credit.strategy": strategy, "schedule.mode": "constant",
                          "schedule.initial_magnitude": 0.0})
        out[strategy] = run_step(cfg, tiny_model_cfg, tiny_params, data, with_ref=False)[0]["params"]
    for strategy in ("tp", "forking", "entropy_adv"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     out[strategy], out["uniform"])


# ---- What the on-policy shortcut old_logp = sg(logp) relies on: sampler and learner agree per token.

def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def prefix_logits(mcfg, params, prompts, plens, completions):
    """Logits that predict completion token t: the causal pass's output at the position of the token
    before it (the prompt's last token for t = 0), indexed here from that rule. -> [N, T, V]"""
    N, T = completions.shape
    G = N // prompts.shape[0]
    P = prompts.shape[1]
    full = np.concatenate([np.repeat(prompts, G, 0), completions], 1)
    valid = np.concatenate([np.repeat(np.arange(P)[None] >= P - plens[:, None], G, 0), np.ones((N, T), bool)], 1)
    logits = np.asarray(jax.jit(model.forward, static_argnums=0)(mcfg, params, full, valid))
    return np.stack([logits[:, P + t - 1] for t in range(T)], 1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_learner_logp_is_next_token_logp_at_the_temperature(tiny_model_cfg, tiny_params, temperature):
    data = {k: np.asarray(v) for k, v in batch(tiny_model_cfg.vocab_size, seed=1).items()}
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    logp, entropy = learner.token_stats(tiny_model_cfg, tiny_params, tokens, valid, P, temperature)
    z = prefix_logits(tiny_model_cfg, tiny_params, data["prompts"], data["prompt_lens"], data["completions"]) / temperature
    ls = np_log_softmax(z.astype(np.float64))
    want_logp = np.take_along_axis(ls, data["completions"][..., None], -1)[..., 0]
    want_ent = -(np.exp(ls) * ls).sum(-1)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(logp)[m], want_logp[m], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[m], want_ent[m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.5, 0.9), pytest.param(0.7, 1.0, marks=SLOW),
                                               pytest.param(1.0, 1.0, marks=SLOW)])
def test_sampler_and_learner_agree_on_every_token(tiny_model_cfg, tiny_params, temperature, top_p):
    """The learner's log-prob of each sampled token equals the sampler's (left-padded prompts), and the
    jitted update reports the gap as `logp_mismatch`."""
    data = batch(tiny_model_cfg.vocab_size, seed=2)
    scfg = SamplingConfig(max_new_tokens=T, eos_id=3, pad_id=0, temperature=temperature, top_p=top_p,
                          num_samples=G)
    out = sample(tiny_model_cfg, scfg, tiny_params, data["prompts"], data["prompt_lens"], jax.random.key(7))
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], out["tokens"], out["lengths"])
    logp, _ = learner.token_stats(tiny_model_cfg, tiny_params, tokens, valid, P, temperature)
    m = np.asarray(mask)
    assert m.sum() > B * G  # several tokens per row
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out["logp"])[m], rtol=1e-4, atol=1e-4)

    cfg = make_cfg(temperature=temperature, top_p=top_p)
    step_batch = {**data, "completions": out["tokens"], "lengths": out["lengths"], "sample_logp": out["logp"]}
    _, metrics = run_step(cfg, tiny_model_cfg, tiny_params, step_batch, with_ref=False)
    assert float(metrics["logp_mismatch"]) < 1e-4
    # a learner at another temperature than the sampler is visible in the metric
    _, metrics = run_step(make_cfg(temperature=temperature * 1.3), tiny_model_cfg, tiny_params, step_batch,
                          with_ref=False)
    assert float(metrics["logp_mismatch"]) > 1e-2


def test_update_gradient_at_the_temperature_matches_a_direct_computation(tiny_model_cfg, tiny_params):
    """GRPO at temperature 1.4: grad = -sum_tokens A_i d logp_t / #tokens, logp from logits / 1.4."""
    temperature = 1.4
    data = batch(tiny_model_cfg.vocab_size, seed=4)
    cfg = make_cfg(temperature=temperature, **{"credit.strategy": "uniform"})
    state, metrics = run_step(cfg, tiny_model_cfg, tiny_params, data, with_ref=False)
    adv = jnp.asarray(np_grpo(data["rewards"]))
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])

    def direct(params):
        logits = model.forward(tiny_model_cfg, params, tokens, valid)
        ls = jax.nn.log_softmax(logits / temperature, -1)
        lp = jnp.take_along_axis(ls[:, P - 1:-1], tokens[:, P:, None], -1)[..., 0]
        return -jnp.sum(adv[:, None] * lp * mask) / jnp.sum(mask)

    grads = jax.grad(direct)(tiny_params)
    update = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), state["params"], tiny_params)  # SGD, lr 1
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, np.asarray(g), rtol=1e-4, atol=1e-5 * scale), update, grads)
    # the entropy metric is at the sampling temperature too
    z = np.asarray(model.forward(tiny_model_cfg, tiny_params, tokens, valid))[:, P - 1:-1] / temperature
    ls = np_log_softmax(z.astype(np.float64))
    m = np.asarray(mask)
    assert float(metrics["entropy"]) == pytest.approx(float((-(np.exp(ls) * ls).sum(-1))[m].mean()), rel=1e-4)


def test_clip_branches_act_inside_the_integrated_loss():
    """policy_loss with old log-probs != current ones, against a NumPy pipeline written from the formulas:
    uniform credit, PPO clip (0.2 / 0.28, dual clip 3), token-mean."""
    rng = np.random.default_rng(0)
    N, Tn = 6, 9
    lengths = np.array([9, 5, 1, 0, 7, 3])
    mask = np.arange(Tn)[None] < lengths[:, None]
    logp = rng.normal(-2, 0.5, (N, Tn)).astype(np.float32)
    old = logp + rng.normal(0, 0.6, (N, Tn)).astype(np.float32)  # ratios spread well past the clip range
    old[4, 2] = logp[4, 2] - np.log(5.0)  # A < 0 with ratio 5: beyond the dual clip constant
    adv = np.array([1.0, -1.0, 0.5, 0.0, -2.0, 1.5], np.float32)
    cfg = make_cfg(**{"credit.strategy": "uniform"})
    num, den, sums = objective.policy_loss(cfg.rl, jnp.float32(0.0), jnp.asarray(logp), jnp.zeros((N, Tn)),
                                           jnp.asarray(adv), jnp.asarray(mask), old_logp=jnp.asarray(old))
    ratio = np.exp(logp - old)
    A = adv[:, None] * np.ones((1, Tn))
    unclipped, clipped = -A * ratio, -A * np.clip(ratio, 0.8, 1.28)
    loss = np.maximum(unclipped, clipped)
    loss = np.where(A < 0, np.minimum(loss, -A * 3.0), loss)
    want = (loss * mask).sum() / mask.sum()
    assert float(num) / float(den) == pytest.approx(want, rel=1e-5)
    clip_frac = ((clipped > unclipped) & mask).sum() / mask.sum()
    assert 0.1 < clip_frac < 0.9
    assert float(sums["clip_frac"][0] / sums["clip_frac"][1]) == pytest.approx(clip_frac)
    assert np.any((A < 0) & (-A * ratio > -A * 3.0) & mask)  # the dual clip binds


def test_kl_metrics_against_a_different_reference_policy(tiny_model_cfg, tiny_params):
    """k3 KL to a reference policy other than the current one, per trajectory-percentile bin; both
    policies' log-probs at the sampling temperature."""
    temperature = 1.3
    data = batch(tiny_model_cfg.vocab_size, seed=6)
    ref_params = model.init_params(tiny_model_cfg, jax.random.key(11))
    _, m = run_step(make_cfg(temperature=temperature), tiny_model_cfg, tiny_params, data, ref_params=ref_params)
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    logp = np.asarray(learner.token_stats(tiny_model_cfg, tiny_params, tokens, valid, P, temperature)[0], np.float64)
    ref = np.asarray(learner.token_stats(tiny_model_cfg, ref_params, tokens, valid, P, temperature)[0], np.float64)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    lengths = np.asarray(data["lengths"])
    sums, counts = np.zeros(objective.KL_BINS), np.zeros(objective.KL_BINS)
    for i, L in enumerate(lengths):
        for t in range(L):
            b = int((t + 0.5) / L * objective.KL_BINS)
            sums[b] += k3[i, t]
            counts[b] += 1
    got = np.array([float(m[f"kl_bin{b}"]) for b in range(objective.KL_BINS)])
    seen = counts > 0
    assert seen.sum() >= 8
    np.testing.assert_allclose(got[seen], sums[seen] / counts[seen], rtol=1e-4, atol=1e-6)
    assert got[seen].min() > 0 and np.all(got[~seen] == 0)


# ---- Several updates per rollout: rl.mini_batches x rl.epochs optimizer steps, old policy = the sampler's.

@SLOW  # test_epochs_visit_the_rows_in_fresh_orders_from_the_step_key checks epochs in the fast set
def test_two_epochs_equal_two_sequential_updates_against_the_sampling_policy(tiny_model_cfg, tiny_params):
    """epochs 2, one mini-batch, SGD lr 1: p1 = p0 - g(p0; old p0), p2 = p1 - g(p1; old p0)."""
    data = batch(tiny_model_cfg.vocab_size, seed=8)
    cfg = make_cfg(epochs=2, **{"credit.strategy": "tp"})
    state, m = run_step(cfg, tiny_model_cfg, tiny_params, data, with_ref=False)
    assert int(state["step"]) == 1  # one rollout batch = one schedule step

    r = jnp.float32(0.99 * (1 - 1 / 8))
    prompt, rows = sampling_policy_rows(tiny_model_cfg, tiny_params, data)
    params = tiny_params
    for _ in range(2):
        _, g, _ = learner.policy_gradient(cfg.rl, tiny_model_cfg, params, None, r, rows, prompt)
        params = jax.tree.map(lambda p, d: p - d, params, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 state["params"], params)
    assert float(m["policy_kl"]) > 0  # the second update saw a moved policy


def test_mini_batches_make_ratios_move_and_clip(tiny_model_cfg, tiny_params):
    """Four mini-batches with a large step: later updates see ratios far from 1, so the clips act, and
    the GSPO sequence ratio gives other parameters than the token ratio (on-policy they coincide)."""
    data = batch(tiny_model_cfg.vocab_size, seed=9)
    tx = optax.sgd(20.0)
    out = {}
    for loss in ("ppo", "gspo"):
        for mini in (1, 4):
            cfg = make_cfg(mini_batches=mini, loss=loss, aggregation="seq-mean-token-mean",
                           **{"credit.strategy": "uniform"})
            state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
            out[loss, mini] = learner.make_rl_step(cfg, tiny_model_cfg, tx)(state, None, data)
    m = out["ppo", 4][1]
    assert float(m["clip_low_frac"]) + float(m["clip_high_frac"]) > 0.01
    assert float(m["ratio_std"]) > 0.05 and float(out["ppo", 1][1]["ratio_std"]) == 0.0
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(out["ppo", 1][0]["params"], out["gspo", 1][0]["params"])  # ratio 1: GSPO = GRPO's update
    assert not same(out["ppo", 4][0]["params"], out["gspo", 4][0]["params"])
    assert not same(out["ppo", 4][0]["params"], out["gspo", 4][0]["params"])


def test_mini_batches_must_split_the_batch():
    from tsched.config import ConfigError, validate

    cfg = make_cfg(mini_batches=3)
    with pytest.raises(ConfigError, match="rl.mini_batches"):
        validate(cfg, num_devices=1)
    cfg = make_cfg(mini_batches=4, micro_batches=4)  # mini-batches of 2 sequences
    with pytest.raises(ConfigError, match="rl.micro_batches"):
        validate(cfg, num_devices=1)


@SLOW  # tests/model/test_attention.py checks values and gradients in the fast set
def test_chunked_logits_and_blockwise_attention_give_the_same_update(tiny_model_cfg, tiny_params):
    # model.logits_chunk / model.attn_block only change memory: the RL step (with the reference policy's
    # pass for the KL metrics) gives the same loss, metrics and parameter update.
    data = batch(tiny_model_cfg.vocab_size, seed=7)
    cfg = make_cfg(micro_batches=2)
    outs = [run_step(cfg, mcfg, tiny_params, data) for mcfg in
            (tiny_model_cfg, dataclasses.replace(tiny_model_cfg, logits_chunk=3, attn_block=4))]
    (s0, m0), (s1, m1) = outs
    for k in m0:
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 s1["params"], s0["params"])


def test_scoring_pass_is_at_the_sampling_temperature(tiny_model_cfg, tiny_params):
    """Several updates per rollout: the old log-probs of the scoring pass are the sampler's, at the
    sampling temperature (the sampler's log-probs are the learner's next-token log-probs at that
    temperature, tested above), so `logp_mismatch` is ~0, and nonzero for a sampler at another temperature."""
    temperature = 1.4
    data = batch(tiny_model_cfg.vocab_size, seed=10)
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    cfg = make_cfg(mini_batches=2, temperature=temperature, **{"credit.strategy": "uniform"})
    tx = optax.sgd(1.0)
    step = learner.make_rl_step(cfg, tiny_model_cfg, tx)  # one compilation for both calls
    for sample_t, small in ((temperature, True), (1.0, False)):
        sample_logp = learner.token_stats(tiny_model_cfg, tiny_params, tokens, valid, P, sample_t)[0] * mask
        state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
        _, m = step(state, None, {**data, "sample_logp": sample_logp})
        assert (float(m["logp_mismatch"]) < 1e-5) == small


def test_each_micro_batch_draws_with_its_own_key(tiny_model_cfg, tiny_params):
    """clip_cov detaches random tokens: micro-batch i draws with fold_in(key, i) over the batch's [N, T]
    arrays (masked to its responses), so accumulating the micro-batches equals summing policy_loss over
    them with those keys, and differs from drawing with one key for every micro-batch."""
    data = batch(tiny_model_cfg.vocab_size, seed=11)
    cfg = make_cfg(micro_batches=2, loss="clip_cov", **{"credit.strategy": "uniform", "credit.clip_cov_ratio": 0.3,
                                                        "credit.clip_cov_lb": -1e9, "credit.clip_cov_ub": 1e9})
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    prompt, rows = learner.split_batch(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    rows["adv"] = adv = jnp.asarray(np_grpo(data["rewards"]))
    key = jax.random.key(4)
    r = jnp.float32(0.0)
    loss, grads, sums = jax.jit(lambda p, rows: learner.policy_gradient(cfg.rl, tiny_model_cfg, p, None, r, rows,
                                                                         prompt, key))(tiny_params, rows)

    @jax.jit
    def micro_grad(params, mask, i):
        def f(params):
            logp, ent = learner.token_stats(tiny_model_cfg, params, tokens, valid, P, cfg.rl.temperature)
            num, den, s = objective.policy_loss(cfg.rl, r, logp, ent, adv, mask, key=jax.random.fold_in(key, i))
            return num, (den, s)
        return jax.grad(f, has_aux=True)(params)

    layout = learner.pack(rows["mask"], rows["group"])
    order, _ = learner.length_groups(layout["fill"], 2, ((B * G // 2, T),))
    in_mb = [np.isin(np.asarray(layout["slot"]), np.asarray(order[i])) for i in range(2)]
    assert all(0 < m.sum() < B * G for m in in_mb) and not (in_mb[0] & in_mb[1]).any()

    def accumulated(keys):
        (g0, (d0, s0)), (g1, (d1, s1)) = (micro_grad(tiny_params, mask & in_mb[m][:, None], i) for m, i in
                                          zip(range(2), keys))
        den = float(d0) + float(d1)
        return jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / den, g0, g1), s0, s1

    want, s0, s1 = accumulated((0, 1))
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * scale), grads, want)
    assert float(sums["cov_frac"][0]) == pytest.approx(float(s0["cov_frac"][0]) + float(s1["cov_frac"][0]))
    one_key = accumulated((0, 0))[0]  # one key for every micro-batch detaches other tokens
    assert not all(np.allclose(np.asarray(a), b, rtol=1e-3, atol=1e-6 * scale)
                   for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one_key)))


def test_epochs_visit_the_rows_in_fresh_orders_from_the_step_key(tiny_model_cfg, tiny_params):
    """epochs 2 x mini-batches 2, SGD lr 1: four sequential updates against the sampling policy, epoch e
    visiting the rows in the order permutation(fold_in(order_key, e)), order_key the first half of the
    split of the step's loss key (a different order per epoch, not one order reused)."""
    data = batch(tiny_model_cfg.vocab_size, seed=12)
    cfg = make_cfg(epochs=2, mini_batches=2, **{"credit.strategy": "tp"})
    state, _ = run_step(cfg, tiny_model_cfg, tiny_params, data, with_ref=False)

    N = B * G
    loss_key = learner.step_keys(jax.random.key_data(jax.random.key(0)), 1)[1]
    order_key = jax.random.split(loss_key)[0]
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(order_key, e), N)) for e in range(2)]
    assert not np.array_equal(orders[0], orders[1])
    r = jnp.float32(0.99 * (1 - 1 / 8))
    prompt, rows = sampling_policy_rows(tiny_model_cfg, tiny_params, data)
    grad = jax.jit(lambda params, mb: learner.policy_gradient(cfg.rl, tiny_model_cfg, params, None, r, mb, prompt)[1])
    params = tiny_params
    for order in orders:
        for idx in order.reshape(2, N // 2):
            g = grad(params, {k: v[idx] for k, v in rows.items()})
            params = jax.tree.map(lambda p, d: p - d, params, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 state["params"], params)


# ---- Each prompt runs once per update, not once per sampled row.

@pytest.mark.parametrize("variant,prompt_len,prompt_pass", [
    ({}, P, "once"), pytest.param({}, P, "per_row"), pytest.param({"scan_layers": True}, P, "once", marks=SLOW),
    pytest.param({"remat": True, "logits_chunk": 3, "attn_block": 4}, P, "once", marks=SLOW),
    pytest.param({}, 1, "once", marks=SLOW), pytest.param({"scan_layers": True}, 1, "per_row", marks=SLOW),
], ids=["unrolled", "per_row", "scan_layers", "remat-chunked", "one-token-prompts", "per_row-scan-one-token"])
def test_prompt_once_update_equals_the_joined_rows(tiny_model_cfg, tiny_params, variant, prompt_len, prompt_pass):
    """policy_gradient and score (each prompt's keys and values computed once, its responses packed into
    shared rows after them, in length-bucketed micro-batches; or with rl.prompt_pass=per_row the prompt
    at the front of each packed row)
    against one pass over every row joined to its prompt at full length: the same log-probs and entropies
    on the response tokens, loss and gradient."""
    mcfg = dataclasses.replace(tiny_model_cfg, **variant)
    data = batch(mcfg.vocab_size, seed=14)
    data["prompts"], data["prompt_lens"] = data["prompts"][:, P - prompt_len:], jnp.minimum(data["prompt_lens"], prompt_len)
    if prompt_len > 1:  # left padding, and a one-token prompt in a batch of longer ones
        assert sorted(np.asarray(data["prompt_lens"]).tolist()) == [1, 5]
    data["lengths"] = data["lengths"].at[::2].set((data["lengths"][::2] + 2) // 3)  # short ones that pack
    cfg = make_cfg(micro_batches=2, length_buckets=3, prompt_pass=prompt_pass, **{"credit.strategy": "entropy_adv"})
    r = jnp.float32(0.3)
    adv = jnp.asarray(np_grpo(data["rewards"]))
    tokens, valid, mask = learner.join(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])

    def joined(params):
        logp, ent = learner.token_stats(mcfg, params, tokens, valid, prompt_len, cfg.rl.temperature)
        num, den, _ = objective.policy_loss(cfg.rl, r, logp, ent, adv, mask)
        return num / den, (logp, ent)

    (want_loss, (want_logp, want_ent)), want = jax.value_and_grad(joined, has_aux=True)(tiny_params)
    prompt, rows = learner.split_batch(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    rows["adv"] = adv
    assert int(jnp.max(rows["group"])) == B - 1 and rows["group"].shape == (B * G,)
    fill = np.asarray(learner.pack(rows["mask"], rows["group"])["fill"])
    assert 0 < np.sum(fill > 0) <= B * G - 3  # responses share packed rows
    loss, grads, _ = jax.jit(lambda p: learner.policy_gradient(cfg.rl, mcfg, p, None, r, rows, prompt))(tiny_params)
    logp, ent = jax.jit(lambda p: learner.score(cfg.rl, mcfg, p, rows, prompt))(tiny_params)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(want_logp)[m], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(ent)[m], np.asarray(want_ent)[m], rtol=1e-5, atol=2e-6)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale),
                 grads, want)


@pytest.mark.parametrize("rl,want", [
    ({"micro_batches": 2}, {("prompt", (B, P - 1)), ("rows", (B * G // 2, T))}),
    ({"micro_batches": 2, "epochs": 2, "mini_batches": 2},
     {("prompt", (B, P - 1)), ("rows", (B * G // 2, T)), ("rows", (B * G // 4, T))}),
    ({"micro_batches": 2, "prompt_pass": "per_row"}, {("rows", (B * G // 2, P - 1 + T))}),
], ids=["on-policy", "scored-epochs-minibatches", "per_row"])
def test_where_the_update_runs_the_prompts(tiny_model_cfg, tiny_params, monkeypatch, rl, want):
    """The model's prompt passes (of the policy, the reference policy and the scoring pass) see the B
    prompts (their first P - 1 tokens), and the row passes only each row's last prompt token and its
    completion, in micro-batches: nothing of size N x P. With rl.prompt_pass=per_row each micro-batch
    runs its rows joined to their prompts instead."""
    shapes = []
    real = learner.model_lib.hidden_states
    monkeypatch.setattr(learner.model_lib, "hidden_states", lambda cfg, params, tokens, *a: (
        shapes.append(("rows", tokens.shape)), real(cfg, params, tokens, *a))[1])
    real_kv = learner.model_lib.prompt_kv
    monkeypatch.setattr(learner.model_lib, "prompt_kv", lambda cfg, params, tokens, *a: (
        shapes.append(("prompt", tokens.shape)), real_kv(cfg, params, tokens, *a))[1])
    cfg = make_cfg(length_buckets=1, **rl)
    run_step(cfg, tiny_model_cfg, tiny_params, batch(tiny_model_cfg.vocab_size))
    assert set(shapes) == want


# ---- Update cost that follows response lengths: length-sorted micro-batches at bucketed lengths.

def test_length_groups_sort_rows_and_pick_the_cheapest_shape():
    lengths = np.array([7, 0, 3, 10, 3, 1, 9, 2])
    assert learner.bucket_lengths(T, 3) == (3, 5, 10)
    assert learner.bucket_lengths(T, 1) == (T,) and learner.bucket_lengths(7, 4) == (1, 2, 4, 7)
    assert learner.bucket_shapes(4, T, 1) == ((4, T),)
    assert learner.bucket_shapes(2, T, 3, row_buckets=False) == ((2, 3), (2, 5), (2, 10))
    # rows 4 / 2^i and lengths 10 / 2^j for i + j < 3, cheapest first
    shapes = learner.bucket_shapes(4, T, 3)
    assert shapes == ((1, 10), (2, 5), (4, 3), (2, 10), (4, 5), (4, 10))
    order, shape = learner.length_groups(jnp.asarray(lengths), 2, shapes)
    want = np.argsort(lengths, kind="stable").reshape(2, 4)  # ties (the two 3s) keep their row order
    np.testing.assert_array_equal(np.asarray(order), want)
    # rows 0, 1, 2, 3 (3 with a token, longest 3) -> (4, 3); rows 3, 7, 9, 10 -> (4, 10)
    np.testing.assert_array_equal(np.asarray(shape), [2, 5])
    x = jnp.arange(8 * 3).reshape(8, 3)
    for m in range(2):
        np.testing.assert_array_equal(np.asarray(learner.grouped(x, order)[m]), np.asarray(x)[want[m]])
    # fewer used rows run at fewer rows: none -> empty branch; two of at most 5 -> (2, 5); one of 9 -> (1, 10)
    _, shape = learner.length_groups(jnp.asarray([9, 0, 9, 0, 0, 5, 9, 0, 4, 0, 9, 0]), 3, shapes)
    np.testing.assert_array_equal(np.asarray(shape), [6, 1, 5])
    _, shape = learner.length_groups(jnp.asarray([0, 0, 0, 0, 0, 0, 0, 9]), 2, shapes)
    np.testing.assert_array_equal(np.asarray(shape), [6, 0])
    run = learner.per_bucket(shapes, lambda s, x: jnp.full(3, s[0] * s[1]) + x)
    assert np.asarray(run(1, 1.0)).tolist() == [11.0] * 3 and np.asarray(run(6, 1.0)).tolist() == [0.0] * 3
    mb = learner.last_rows({"a": jnp.arange(4), "index": jnp.int32(2)}, 2)
    assert np.asarray(mb["a"]).tolist() == [2, 3] and int(mb["index"]) == 2


def np_pack(lengths, group, T):
    """First-fit decreasing per prompt, written from its definition: each prompt's responses, longest first
    (ties by row), into the first of that prompt's rows with room, else a new row. -> list of
    (group, [rows in placement order], fill)."""
    bins = []
    for g in sorted(set(group)):
        rows = sorted(np.flatnonzero(group == g), key=lambda n: (-lengths[n], n))
        for n in rows:
            for b in bins:
                if b[0] == g and b[2] + lengths[n] <= T:
                    b[1].append(n)
                    b[2] += lengths[n]
                    break
            else:
                bins.append([g, [n], lengths[n]])
    return bins


@pytest.mark.parametrize("seed", range(4))
def test_pack_is_first_fit_decreasing_per_prompt(seed):
    """`pack` against a NumPy first-fit decreasing: the same packed rows, each holding one prompt's
    responses at consecutive columns, longest first; rows in any order (a mini-batch's random subset)."""
    rng = np.random.default_rng(seed)
    N, T_ = 24, 16
    lengths = np.minimum(np.ceil(rng.lognormal(np.log(T_ / 4), 1.0, N)), T_).astype(int)
    lengths[rng.integers(N)] = 0
    group = rng.permutation(np.arange(N) // 6)
    mask = jnp.asarray(np.arange(T_)[None] < lengths[:, None])
    got = jax.jit(learner.pack)(mask, jnp.asarray(group, jnp.int32))
    slot, start, fill, owner = (np.asarray(got[k]) for k in ("slot", "start", "fill", "group"))
    want = np_pack(lengths, group, T_)
    assert len(want) < N - 6  # the case packs
    for k, (g, rows, f) in enumerate(want):
        assert slot[rows].tolist() == [k] * len(rows) and owner[k] == g and fill[k] == f <= T_
        np.testing.assert_array_equal(start[rows], np.cumsum([0] + [lengths[n] for n in rows[:-1]]))
    assert (fill[len(want):] == 0).all()


@pytest.mark.parametrize("rl", [
    {"aggregation": "seq-mean-token-sum-norm", "credit.strategy": "forking_batch", "credit.normalizer": "valid_tokens"},
    pytest.param({"aggregation": "token-mean", "credit.strategy": "tp"}, marks=SLOW),
    pytest.param({"aggregation": "seq-mean-token-mean", "credit.strategy": "empg", "loss": "gspo", "kl_coef": 0.1},
                 marks=SLOW),
    pytest.param({"aggregation": "token-mean", "credit.strategy": "uniform", "loss": "clip_cov",
                  "credit.clip_cov_ratio": 0.3, "credit.clip_cov_lb": -1e9, "credit.clip_cov_ub": 1e9}, marks=SLOW),
    pytest.param({"aggregation": "seq-mean-token-sum", "credit.strategy": "forking", "epochs": 2, "mini_batches": 2,
                  "loss": "trace"}, marks=SLOW),
], ids=["forking_batch-norm", "tp", "empg-gspo-kl", "clip_cov", "epochs-mini-trace"])
def test_length_buckets_give_the_padded_update(tiny_model_cfg, tiny_params, rl):
    """Every micro-batch at the full length (1 bucket) and at length buckets (3, 5, 10): the same loss,
    metrics and parameter update, for selection and shaping criteria with per-micro-batch statistics, a
    random loss, the horizon normaliser, KL to a reference policy, and several updates per rollout."""
    data = batch(tiny_model_cfg.vocab_size, seed=13)
    ref_params = model.init_params(tiny_model_cfg, jax.random.key(11))
    outs = [run_step(make_cfg(micro_batches=2 if "epochs" in rl else 4, length_buckets=n, **rl), tiny_model_cfg,
                     tiny_params, data, ref_params=ref_params) for n in (1, 3)]
    (s0, m0), (s1, m1) = outs
    # the batch really runs in several buckets
    _, rows = learner.split_batch(data["prompts"], data["prompt_lens"], data["completions"], data["lengths"])
    fill = learner.pack(rows["mask"], rows["group"])["fill"]
    shapes = learner.bucket_shapes(B * G // 4, T, 3)
    assert len(set(np.asarray(learner.length_groups(fill, 4, shapes)[1]).tolist())) >= 2
    assert float(m0["grad_norm"]) > 0
    for k in m0:
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=5e-5, atol=1e-6, err_msg=k)
    scale = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(tiny_params)))
    # Summation order: other shapes sum the same terms in other orders. With XLA's backend optimizations off
    # (the suite's default, tests/conftest.py) the tied embedding's gradient, a sum of many cancelling
    # terms, then differs by up to 4e-5 of the largest update (3e-7 with them on).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale),
                 s1["params"], s0["params"])


@SLOW  # a compile count; the buckets' values are checked in the fast set
def test_each_length_bucket_is_traced_once(tiny_model_cfg, tiny_params, monkeypatch):
    """One compilation of the step for batches of all-short, all-long and mixed lengths; the model is
    traced at each bucket's length and no other (the scoring pass and the update of several epochs)."""
    traced = []
    stats = learner.micro_stats
    monkeypatch.setattr(learner, "micro_stats", lambda *a: (traced.append(a[6]), stats(*a))[1])
    cfg = make_cfg(micro_batches=2, epochs=2, length_buckets=3)
    tx = optax.sgd(1e-3)
    state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
    step = learner.make_rl_step(cfg, tiny_model_cfg, tx)
    for i, lengths in enumerate((np.full(B * G, 2), np.full(B * G, T), np.arange(1, B * G + 1))):
        data = batch(tiny_model_cfg.vocab_size, seed=i)
        data["lengths"] = jnp.asarray(lengths, jnp.int32)
        state, m = step(state, None, data)
        assert np.isfinite(float(m["loss"]))
        if i == 0:
            after_first = list(traced)
    assert step._cache_size() == 1
    assert traced == after_first
    assert set(traced) == {3, 5, 10}

