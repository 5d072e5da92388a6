"""Log-probs and entropies of target tokens straight from hidden states, without the whole logits array.

For Qwen3 (V = 151,936) a micro-batch of 4k-token responses has logits of N * T * V float32 values
(2.3 GiB per row), and XLA keeps them and the softmax for the backward. `token_stats` computes the unembedding, log-softmax and entropy `chunk` positions at a time
under `lax.map`, with a custom VJP whose backward recomputes each chunk's logits from the hidden states
and the head, so neither pass holds more than [N, chunk, V] logits.

Shapes: N rows, T positions, D d_model, V vocab, C = chunk positions, M = T / C chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tsched.model.decoder import ModelConfig, Params, unembed


def output_head(cfg: ModelConfig, params: Params) -> tuple[jax.Array, str]:
    """The unembedding matrix as stored and its contraction with hidden states [N, C, D] -> [N, C, V]:
    the tied `embedding` [V, D] or the untied `lm_head` [D, V] (used in place: no transposed copy)."""
    if cfg.tie_embeddings:
        return params["embedding"], "ncd,vd->ncv"
    return params["lm_head"], "ncd,dv->ncv"


def stats_from_logits(logits: jax.Array, targets: jax.Array, temperature: float = 1.0):
    """logits [N, T, V], targets [N, T] -> log-prob of each target and the entropy [N, T], at `temperature`.

    H = logsumexp(z) - sum softmax(z) z with z = logits / temperature.
    """
    z = logits / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - lse
    entropy = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    return logp, entropy


def token_stats(cfg: ModelConfig, params: Params, h: jax.Array, targets: jax.Array, temperature: float = 1.0,
                chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Final-normed hidden states h [N, T, D], targets [N, T] -> (log-prob of each target, entropy) [N, T].

    With z = logits / temperature: log-prob = z[target] - logsumexp(z), H = logsumexp(z) - sum softmax(z) z.
    chunk: positions per chunk (0 = the whole [N, T, V] logits at once, the faster path for small V).
    When T is not a multiple of chunk, the last chunk is padded with zero hidden states whose results
    are cut off (their cotangents are zero, so they add nothing to the head's gradient).
    """
    if chunk <= 0:
        return stats_from_logits(unembed(cfg, params, h), targets, temperature)
    N, T, D = h.shape
    C = min(chunk, T)
    M = -(-T // C)
    pad = M * C - T
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # Chunks along positions, rows kept whole: a batch sharded over rows stays sharded inside each chunk.
    hc = h.reshape(N, M, C, D).swapaxes(0, 1)  # [M, N, C, D]
    tc = targets.reshape(N, M, C).swapaxes(0, 1)  # [M, N, C]
    w, eq = output_head(cfg, params)
    logp, ent = _chunked_stats(hc, w, tc, eq, float(temperature), cfg.compute_dtype)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(N, M * C)[:, :T]
    return unchunk(logp), unchunk(ent)


def _chunk_logits(eq, temperature, dtype, h, w):
    """z = logits / temperature [N, C, V] float32, as `decoder.mm` computes them (compute-dtype inputs)."""
    return jnp.einsum(eq, h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32) / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_stats(hc, w, tc, eq, temperature, dtype):
    """hc [M, N, C, D], w (head), tc [M, N, C] -> log-probs, entropies [M, N, C]."""
    return _chunked_fwd(hc, w, tc, eq, temperature, dtype)[0]


def _chunked_fwd(hc, w, tc, eq, temperature, dtype):
    def one(xs):
        h, t = xs
        z = _chunk_logits(eq, temperature, dtype, h, w)
        lse = jax.nn.logsumexp(z, axis=-1)
        mean_z = jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1)  # E_p[z]
        return jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0] - lse, lse - mean_z, lse, mean_z

    logp, ent, lse, mean_z = jax.lax.map(one, (hc, tc))
    # Residuals are the inputs and two numbers per token; the backward recomputes each chunk's logits.
    return (logp, ent), (hc, w, tc, lse, mean_z)


def _chunked_bwd(eq, temperature, dtype, res, g):
    """d logp / dz = onehot(target) - p;  d H / dz = -p (z - E_p[z]);  d / dlogits = d / dz / temperature.

    The head's gradient is a carry of the scan over chunks (one [V, D] buffer, not one per chunk); the
    two matmuls take compute-dtype inputs with float32 accumulation, as `decoder.mm`'s backward does.
    """
    hc, w, tc, lse, mean_z = res
    g_logp, g_ent = g
    ins, out = eq.split("->")
    sh, sw = ins.split(",")

    def one(dw, xs):
        h, t, lse, mean_z, g_logp, g_ent = xs
        z = _chunk_logits(eq, temperature, dtype, h, w)
        p = jnp.exp(z - lse[..., None])
        onehot = jnp.arange(z.shape[-1]) == t[..., None]
        dz = g_logp[..., None] * (onehot - p) - (g_ent[..., None] * p) * (z - mean_z[..., None])
        dlogits = (dz / temperature).astype(dtype)
        dh = jnp.einsum(f"{out},{sw}->{sh}", dlogits, w.astype(dtype), preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum(f"{sh},{out}->{sw}", h.astype(dtype), dlogits, preferred_element_type=jnp.float32)
        return dw, dh.astype(hc.dtype)

    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (hc, tc, lse, mean_z, g_logp, g_ent))
    return dh, dw.astype(w.dtype), None


_chunked_stats.defvjp(_chunked_fwd, _chunked_bwd)
