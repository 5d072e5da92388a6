"""The jitted RL update: exact gradient accumulation, one compilation, and the loss on a NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny import set_field
from tsched.config import base_config
from tsched.rl import objective
from tsched.train import learner

B, G, P, T = 2, 4, 6, 10


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
    return [jnp.asarray(x, dtype) for x, dtype in ((prompts, jnp.int32), (prompt_lens, jnp.int32),
                                                   (completions, jnp.int32), (lengths, jnp.int32),
                                                   (rewards, jnp.float32))]


def run_step(cfg, mcfg, params, data, with_ref=True):
    # Plain SGD: parameter changes are the gradients themselves (Adam's first step is lr * sign(g),
    # which turns float rounding in near-zero gradients into full-size differences).
    tx = optax.sgd(1.0)
    state = learner.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(0))
    step = learner.make_rl_step(cfg, mcfg, tx)
    return step(state, params if with_ref else None, *data)


@pytest.mark.parametrize("mode,strategy,normalizer", [
    ("token-mean", "tp", "selected_tokens"), ("seq-mean-token-sum", "forking", "valid_tokens"),
    ("seq-mean-token-mean", "entropy_adv", "selected_tokens"), ("seq-mean-token-sum-norm", "forking", "selected_tokens"),
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


def test_compiles_once_across_steps(tiny_model_cfg, tiny_params):
    cfg = make_cfg()
    tx = learner.make_optimizer(1e-3, 1.0)
    state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
    step = learner.make_rl_step(cfg, tiny_model_cfg, tx)
    mags = []
    for i in range(4):
        state, m = step(state, tiny_params, *batch(tiny_model_cfg.vocab_size, seed=i))
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
    prompts, plens, comps, lens, rewards = map(np.asarray, data)
    r = np.float32(0.99 * (1 - 1 / 8))
    s = rewards.reshape(B, G)
    adv = ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
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


def test_kl_metrics_zero_at_the_reference(tiny_model_cfg, tiny_params):
    _, m = run_step(make_cfg(), tiny_model_cfg, tiny_params, batch(tiny_model_cfg.vocab_size))
    assert all(abs(float(m[f"kl_bin{i}"])) < 1e-6 for i in range(objective.KL_BINS))


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
