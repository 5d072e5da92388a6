"""Chunked log-probs and entropies: the values and gradients of the whole-logits path, without its memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched import model
from tsched.model import logits

N, T, D, V = 3, 12, 16, 40


def setup(tie, dtype="float32"):
    cfg = model.ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32,
                            tie_embeddings=tie, dtype=dtype)
    params = model.init_params(cfg, jax.random.key(0))
    # Head weights giving logits of std ~1.5 (max ~7 at temperature 0.7): far from uniform, and float32
    # rounding of the largest logits stays below the 1e-5 tolerance in the gradients.
    params = {k: (0.25 * jax.random.normal(jax.random.key(3), p.shape) if k in ("embedding", "lm_head") else p)
              for k, p in params.items()}
    h = jax.random.normal(jax.random.key(1), (N, T, D))
    targets = jax.random.randint(jax.random.key(2), (N, T), 0, V)
    return cfg, params, h, targets


def weighted(cfg, targets, temperature, chunk):
    """A scalar of both outputs with distinct weights per token, so every cotangent is exercised."""
    w1, w2 = jax.random.normal(jax.random.key(4), (2, N, T))

    def f(head, h):
        logp, ent = logits.token_stats(cfg, head, h, targets, temperature, chunk)
        return jnp.sum(w1 * logp) + jnp.sum(w2 * ent)

    return f


def reference(cfg, params, h, targets, temperature):
    """Whole logits through the objective's formula (the path of logits_chunk = 0)."""
    return logits.stats_from_logits(model.unembed(cfg, params, h), targets, temperature)


def test_unchunked_formula_matches_numpy():
    cfg, params, h, targets = setup(tie=True)
    z = np.asarray(h, np.float64) @ np.asarray(params["embedding"], np.float64).T / 0.7
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    p = np.exp(z - lse[..., None])
    logp = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0] - lse
    ent = -np.sum(p * np.log(p), -1)
    got = logits.token_stats(cfg, params, h, targets, 0.7, chunk=0)
    np.testing.assert_allclose(np.asarray(got[0]), logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [4, 5, 64])  # divides T, does not (padded last chunk), > T
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_whole_logits_values_and_gradients(tie, chunk, temperature):
    cfg, params, h, targets = setup(tie)
    want = reference(cfg, params, h, targets, temperature)
    got = logits.token_stats(cfg, params, h, targets, temperature, chunk)
    for a, b in zip(got, want):
        assert a.shape == b.shape == (N, T)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    g_whole = jax.grad(weighted(cfg, targets, temperature, 0), (0, 1))(params, h)
    g_chunk = jax.grad(weighted(cfg, targets, temperature, chunk), (0, 1))(params, h)
    head = "embedding" if tie else "lm_head"
    assert float(jnp.max(jnp.abs(g_whole[0][head]))) > 1e-2  # the head's gradient is really compared
    np.testing.assert_allclose(np.asarray(g_chunk[0][head]), np.asarray(g_whole[0][head]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_chunk[1]), np.asarray(g_whole[1]), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                 g_chunk[0], g_whole[0])


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_bfloat16_follows_the_compute_dtype(tie):
    # bf16 matmul inputs, f32 accumulation in both paths: equal up to accumulation order.
    cfg, params, h, targets = setup(tie, "bfloat16")
    got = logits.token_stats(cfg, params, h, targets, 1.0, 5)
    want = reference(cfg, params, h, targets, 1.0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    g = [jax.grad(weighted(cfg, targets, 1.0, c), (0, 1))(params, h) for c in (0, 5)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=2e-2), *g)


def test_rl_update_never_holds_the_whole_logits():
    # V = 8192 and N * T = 2048 target tokens: the logits alone would be 64 MiB float32. A chunk of 16
    # positions holds [4, 16, V] logits (2 MiB); the rest of the update needs ~20 MiB at this shape.
    from tsched.config import base_config
    from tsched.train import learner

    Bp, G, P, Tn, Vb = 2, 2, 8, 512, 8192
    cfg = base_config()
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.micro_batches = Bp, G, 1
    cfg.train.kl_metrics = False
    whole = model.ModelConfig(vocab_size=Vb, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                              ffn_dim=64)
    logits_bytes = Bp * G * Tn * Vb * 4

    def temp_bytes(mcfg):
        tx = learner.make_optimizer(1e-3, 1.0)
        params = jax.eval_shape(lambda: model.init_params(mcfg, jax.random.key(0)))
        state = jax.eval_shape(lambda p: learner.init_state(p, tx, jax.random.key(0)), params)
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
        batch = {"prompts": i32(Bp, P), "prompt_lens": i32(Bp), "completions": i32(Bp * G, Tn),
                 "lengths": i32(Bp * G), "rewards": jax.ShapeDtypeStruct((Bp * G,), jnp.float32)}
        compiled = learner.make_rl_step(cfg, mcfg, tx).lower(state, None, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(whole) > logits_bytes  # the check can see a whole-logits buffer when there is one
    assert temp_bytes(dataclasses.replace(whole, logits_chunk=16)) < logits_bytes / 2
