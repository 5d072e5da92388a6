"""Blockwise (flash) attention: the values and gradients of `decoder.attention`, one key block at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsched.model import decoder

B, K, G, T, Dh = 2, 2, 3, 11, 4


def inputs():
    q, k, v, w = (jax.random.normal(jax.random.key(i), s) for i, s in
                  enumerate([(B, K, G * T, Dh), (B, K, Dh, T), (B, K, T, Dh), (B, K, G * T, Dh)]))
    # Causal with left padding: row 0 has 4 padding slots, whose queries see no key at all.
    slots, pad = jnp.arange(T), jnp.array([4, 0])
    mask = (slots[None, :, None] >= slots[None, None, :]) & (slots[None, None, :] >= pad[:, None, None])
    return q, k, v, w, mask


@pytest.mark.parametrize("block", [1, 4, 5, 11, 16])  # divides S or not (padded last block), = S, > S
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blockwise_equals_attention_values_and_gradients(block, dtype):
    q, k, v, w, mask = inputs()
    assert not bool(jnp.any(mask[0, 0]))  # a fully masked query row is part of the comparison
    dt = jnp.dtype(dtype)
    whole = lambda q, k, v: decoder.attention(q, k, v, mask, dt)
    blocks = lambda q, k, v: decoder.attention_blockwise(q, k, v, mask, dt, block)
    tol = 1e-5 if dtype == "float32" else 3e-2
    want, got = whole(q, k, v), blocks(q, k, v)
    assert not bool(jnp.any(jnp.isnan(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
    for a, b in zip(jax.grad(loss(blocks), (0, 1, 2))(q, k, v), jax.grad(loss(whole), (0, 1, 2))(q, k, v)):
        assert not bool(jnp.any(jnp.isnan(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_fully_masked_rows_average_all_values():
    # What `attention` gives a padding query (uniform weights, from the finite NEG_INF), computed directly.
    q, k, v, _, mask = inputs()
    o = decoder.attention_blockwise(q, k, v, mask, jnp.float32, 3).reshape(B, K, G, T, Dh)
    np.testing.assert_allclose(np.asarray(o[0, :, :, :4]),
                               np.broadcast_to(np.asarray(v[0].mean(1))[:, None, None], (K, G, 4, Dh)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_model_with_blockwise_attention_and_chunked_logits(tiny_model_cfg, tiny_params, scan_layers):
    # The whole stack, left-padded rows included: log-probs, entropies and every parameter's gradient.
    from tsched.train import learner

    tokens = jax.random.randint(jax.random.key(7), (3, 13), 0, tiny_model_cfg.vocab_size)
    valid = jnp.arange(13)[None] >= jnp.array([0, 3, 5])[:, None]
    w = jax.random.normal(jax.random.key(8), (2, 3, 8))

    def run(cfg):
        def f(p):
            logp, ent = learner.token_stats(cfg, p, tokens, valid, 5, 0.7)
            return jnp.sum(w[0] * logp) + jnp.sum(w[1] * ent), (logp, ent)

        return jax.value_and_grad(f, has_aux=True)(tiny_params)

    base = dataclasses.replace(tiny_model_cfg, scan_layers=scan_layers)
    (_, want), g_want = run(base)
    (_, got), g_got = run(dataclasses.replace(base, attn_block=4, logits_chunk=3))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 g_got, g_want)
