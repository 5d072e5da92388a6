"""The Llama / Qwen family decoder in Flax linen, with logical axis names on every parameter.

RMSNorm, rotary embeddings (optionally llama3-scaled), grouped-query attention with an optional KV cache,
optional q/k RMSNorm (Qwen3) and qkv bias (Qwen2), SwiGLU MLP, tied or untied embeddings. Layer
parameters are stacked on a leading 'layers' axis; full passes (`full_pass`) run them under `lax.scan`
(`scan_layers=True`, compile time independent of depth) or unrolled (faster on CPU), and can continue
prompts whose keys and values were computed once per prompt; cached decoding is unrolled.

Compute dtype: weights are float32 masters; with `dtype='bfloat16'` matmul inputs are cast to bf16 and
accumulate in float32 (`preferred_element_type`), which is also the fast path of CPUs with avx512_bf16.
The residual stream, norms, softmax and logits stay float32.

Shapes: B batch, T query tokens, S key slots (= T without a cache), D d_model, H query heads,
K kv heads, G = H // K, Dh head_dim, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsched.sharding import pin_rows

Params = Any
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give a uniform softmax, never NaN
COMPUTE_DTYPES = ("float32", "bfloat16")  # matmul input dtypes (`model.dtype`); accumulation is float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    # llama3-style scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple[float, float, float, int] | None = None
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"
    remat: bool = False
    # Full passes (training, scoring; `full_pass`) run the layers under lax.scan (compile time independent
    # of depth) or unrolled (faster on CPU: no stacked residual buffers). Cached decoding is always unrolled.
    scan_layers: bool = False
    # Memory of full passes at long sequence lengths and large vocabularies (0 = off, the fastest for
    # small shapes): the update computes log-probs `logits_chunk` positions at a time without the whole
    # [B, T, V] logits (tsched.model.logits), and attention over key blocks of `attn_block` slots
    # without the whole [T, S] scores (attention_blockwise).
    logits_chunk: int = 0
    attn_block: int = 0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        D, F, H, K, Dh, V, L = (self.d_model, self.ffn_dim, self.n_heads, self.n_kv_heads, self.head_dim,
                                self.vocab_size, self.n_layers)
        attn = D * (H + 2 * K) * Dh + H * Dh * D + (self.qkv_bias * (H + 2 * K) * Dh) + self.qk_norm * 2 * Dh
        per_layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_embeddings else 2) + L * per_layer + D


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2]; llama3 scaling stretches the low frequencies (long wavelengths)."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv
    factor, low, high, orig = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / factor, jnp.where(wavelen < high_wavelen, inv, mid))


def rope(cfg: ModelConfig, positions: jax.Array, table: tuple | None = None) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, Dh/2] of the rotary angles at positions [B, T], computed, or looked up in a
    `table` from `rope_table`: a decode step looks them up, because XLA:CPU fused cos and sin into each
    rotation and evaluated them once per head and half-dimension element (the lookup made sampling at the
    bench's reference shape 5% faster)."""
    if table is not None:
        return table[0][positions], table[1][positions]
    angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    return jnp.cos(angles), jnp.sin(angles)


def rope_table(cfg: ModelConfig, n: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [n, Dh/2] of positions 0 .. n - 1, for `rope(..., table)`."""
    cos, sin = rope(cfg, jnp.arange(n)[None])
    return cos[0], sin[0]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh] rotated by the angles of `rope` (cos, sin [B, T, Dh/2]; rotate-half convention of HF
    Llama / Qwen)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mm(eq: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum with inputs cast to the compute dtype and float32 accumulation."""
    return _einsum(eq, a.astype(dtype), b.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _einsum_fwd(eq, a, b):
    return _einsum(eq, a, b), (a, b)


def _einsum_bwd(eq, res, g):
    """Both cotangents as einsums whose first operand is the smaller one.

    Why a custom rule: XLA:CPU lowers a contraction over leading dims (the weight gradient sum_bt x g)
    by materialising the transpose of its left operand. The default transpose rule puts the output
    cotangent there, which for an up-projection is 4x larger than the activation and was fused with
    the elementwise backward into a strided copy costing more than every matmul of the layer.
    """
    a, b = res
    ins, out = eq.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)

    def grad(target, x, sx, y, sy):
        first, second = ((x, sx), (y, sy)) if x.size <= y.size else ((y, sy), (x, sx))
        eq_t = f"{first[1]},{second[1]}->{target}"
        return jnp.einsum(eq_t, first[0], second[0], preferred_element_type=jnp.float32)

    da = grad(sa, g, out, b, sb)
    db = grad(sb, a, sa, g, out)
    return da.astype(a.dtype), db.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, fan_in: int | None, scale: float = 1.0,
           draw_transposed: bool = False):
    """A float32 parameter with logical axes; fan_in None = ones (norm scales), 0 = zeros (biases).

    draw_transposed: draw a 2-d normal init as shape[::-1] and transpose it, so a matrix whose storage
    was transposed keeps the initial values of the earlier layout (and runs keep their results).
    """
    if fan_in is None:
        init = nn.initializers.ones
    elif fan_in == 0:
        init = nn.initializers.zeros
    else:
        init = nn.initializers.normal(scale / math.sqrt(fan_in))
        if draw_transposed:
            init = lambda key, shape, dtype, draw=init: draw(key, shape[::-1], dtype).T
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def bmm(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """Batched matmul a [B, K, Q, M] @ b [B, K, M, N] -> [B, K, Q, N] float32 (the attention contractions).

    With a single query token (Q = heads per kv head) it is a matrix-vector product bound by reading
    the KV cache, so it runs as one fused multiply-reduce pass over the cache rather than B*K tiny
    matmuls: 3x faster per decode step on XLA:CPU.
    """
    if a.shape[2] > 8:  # more query rows than one token's heads per kv head: a real matmul
        return mm("bkqm,bkmn->bkqn", a, b, dtype)
    a, b = a.astype(dtype).astype(jnp.float32), b.astype(dtype)
    return jnp.sum(a[..., None] * b[:, :, None], axis=-2, dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Softmax attention: q [B, K, G*T, Dh], k [B, K, Dh, S], v [B, K, S, Dh], mask [B, T, S] -> [B, K, G*T, Dh].

    Query rows are (g, t) pairs, G query heads sharing each of the K kv heads.
    """
    return _attention_fwd(q, k, v, mask, dtype)[0]


def _attention_fwd(q, k, v, mask, dtype):
    B, K, Q, Dh = q.shape
    T, S = mask.shape[1:]
    scores = bmm(q, k, dtype).reshape(B, K, Q // T, T, S) / math.sqrt(Dh)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).reshape(B, K, Q, S)
    o = bmm(probs, v, dtype)
    return o, (q, k, v, probs, o, mask)


def _attention_bwd(dtype, res, do):
    """The textbook backward, as four plain matmuls and one elementwise pass.

    Why: autodiff of softmax fused the dp matmul and the softmax derivative into one XLA:CPU kernel that
    ran at ~10 GFLOP/s; rowsum(p * dp) = rowsum(do * o) also avoids a reduction over the [Q, S] scores.
    """
    q, k, v, p, o, mask = res
    B, K, Q, Dh = q.shape
    T, S = mask.shape[1:]
    f32 = lambda eq, a, b: jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    dp = f32("bkqd,bksd->bkqs", do, v)
    ds = (p * (dp - jnp.sum(do * o, axis=-1, keepdims=True)) / math.sqrt(Dh)).reshape(B, K, Q // T, T, S)
    ds = jnp.where(mask[:, None, None], ds, 0.0).reshape(B, K, Q, S)  # masked scores are constants
    dq = f32("bkqs,bkds->bkqd", ds, k)
    dk = f32("bkqd,bkqs->bkds", q, ds)
    dv = f32("bkqd,bkqs->bkds", do, p).swapaxes(-1, -2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)


def attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype, block: int) -> jax.Array:
    """`attention` over key blocks of `block` slots with an online softmax (flash attention), same shapes.

    Neither pass holds more than [B, K, G*T, block] scores: the forward keeps a running max m, sum l and
    unnormalised output per query row; the backward recomputes each block's probabilities from m and l.
    Fully masked query rows get the uniform average of all S values, as in `attention` (NEG_INF is finite,
    so their running max is NEG_INF and every slot weighs exp(0)). When S is not a multiple of `block`,
    the last block is padded with slots scored -inf, which weigh nothing even in those rows.
    """
    B, K, Dh, S = k.shape
    T = mask.shape[1]
    C = min(block, S)
    nb = -(-S // C)
    pad = nb * C - S
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(B, K, Dh, nb, C).transpose(3, 0, 1, 2, 4)
    vb = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, K, nb, C, Dh).transpose(2, 0, 1, 3, 4)
    mb = jnp.pad(mask, ((0, 0), (0, 0), (0, pad))).reshape(B, T, nb, C).transpose(2, 0, 1, 3)
    real = (jnp.arange(nb * C) < S).reshape(nb, C)
    return _flash(q, kb, vb, mb, real, dtype)


def _block_scores(q, k, mask, real, dtype):
    """Scaled, masked scores [B, K, G*T, C] of q [B, K, G*T, Dh] against one key block k [B, K, Dh, C]."""
    B, K, Q, Dh = q.shape
    T, C = mask.shape[1:]
    s = bmm(q, k, dtype).reshape(B, K, Q // T, T, C) / math.sqrt(Dh)
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    return jnp.where(real, s, -jnp.inf).reshape(B, K, Q, C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, kb, vb, mb, real, dtype):
    """q [B, K, G*T, Dh]; key blocks kb [nb, B, K, Dh, C], vb [nb, B, K, C, Dh], mb [nb, B, T, C], real [nb, C]."""
    return _flash_fwd(q, kb, vb, mb, real, dtype)[0]


def _flash_fwd(q, kb, vb, mb, real, dtype):
    B, K, Q, Dh = q.shape

    def step(carry, xs):
        m, l, acc = carry
        k, v, mask, r = xs
        s = _block_scores(q, k, mask, r, dtype)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        return (m_new, l * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + bmm(p, v, dtype)), None

    init = (jnp.full((B, K, Q), NEG_INF, jnp.float32), jnp.zeros((B, K, Q), jnp.float32),
            jnp.zeros((B, K, Q, Dh), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb, real))
    o = acc / l[..., None]
    # m and l separately, not logsumexp = m + log l: for a fully masked row m = NEG_INF absorbs log l in
    # float32, and the backward would lose the 1 / S of its uniform probabilities.
    return o, (q, kb, vb, mb, real, o, m, l)


def _flash_bwd(dtype, res, do):
    """`_attention_bwd` one key block at a time: dq accumulates in the scan carry, dk and dv are per block."""
    q, kb, vb, mb, real, o, m, l = res
    B, K, Q, Dh = q.shape
    T = mb.shape[2]
    f32 = lambda eq, a, b: jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    delta = jnp.sum(do * o, axis=-1, keepdims=True)

    def step(dq, xs):
        k, v, mask, r = xs
        C = mask.shape[-1]
        p = jnp.exp(_block_scores(q, k, mask, r, dtype) - m[..., None]) / l[..., None]
        ds = (p * (f32("bkqd,bksd->bkqs", do, v) - delta) / math.sqrt(Dh)).reshape(B, K, Q // T, T, C)
        ds = jnp.where(mask[:, None, None], ds, 0.0).reshape(B, K, Q, C)
        dk = f32("bkqd,bkqs->bkds", q, ds)
        dv = f32("bkqd,bkqs->bkds", do, p).swapaxes(-1, -2)
        return dq + f32("bkqs,bkds->bkqd", ds, k), (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, mb, real))
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def cache_dtype(dtype) -> jnp.dtype:
    """Storage type of a KV cache holding `dtype` values: bfloat16 values are kept as their uint16 bit
    patterns, because XLA:CPU rewrites a whole bf16 array on a one-column dynamic-update-slice (1.3 ms
    per layer per token at the reference shape) but updates a uint16 one in place (0.007 ms)."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_cache(x: jax.Array, storage) -> jax.Array:
    """x rounded to the value type of a cache stored as `storage` (see cache_dtype), in that storage."""
    value = jnp.bfloat16 if jnp.dtype(storage) == jnp.uint16 else storage
    return jax.lax.bitcast_convert_type(x.astype(value), storage)


def from_cache(c: jax.Array) -> jax.Array:
    """The cached values, bf16 ones widened to float32 by a shift, exact and fused into the reader (a
    bitcast back to bf16 made XLA copy the whole cache out of the in-place update). A bf16 cache of a
    float32 model (`SamplingConfig.cache_dtype`) is read this way too, and attends in float32."""
    if c.dtype == jnp.uint16:  # see cache_dtype
        return jax.lax.bitcast_convert_type(c.astype(jnp.uint32) << 16, jnp.float32)
    return c


def attention_over_prompt(q: jax.Array, prompt_k: jax.Array, prompt_v: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array, prompt_rows: jax.Array | None, dtype) -> jax.Array:
    """Decode attention of N rows over the cache of their prompt, shared by the rows sampled from it,
    and each row's own cache of generated tokens, with one softmax over both parts.

    q [N, K, G, Dh] (one token per row), prompt_k [B, K, Dh, P], prompt_v [B, K, P, Dh], k [N, K, Dh, S],
    v [N, K, S, Dh], mask [N, 1, P + S] (prompt slots, then own slots) -> [N, K, G, Dh].
    prompt_rows None: the N rows are the samples of the B prompts in order (row r reads prompt r // (N/B)),
    so the prompt part is one matmul per prompt and kv head with all its rows' queries; else [N] the
    prompt of each row (a gather, for a compacted batch).
    """
    N, K, Q, Dh = q.shape
    B, P = prompt_k.shape[0], prompt_k.shape[-1]
    if prompt_rows is None:
        R = N // B
        grouped = lambda x: x.reshape(B, R, K, Q, -1).transpose(0, 2, 1, 3, 4).reshape(B, K, R * Q, -1)
        rowwise = lambda x: x.reshape(B, K, R, Q, -1).transpose(0, 2, 1, 3, 4).reshape(N, K, Q, -1)
        prompt_scores = rowwise(bmm(grouped(q), prompt_k, dtype))
        prompt_out = lambda p: rowwise(bmm(grouped(p), prompt_v, dtype))
    else:
        # Batched matmuls, not `bmm`'s multiply-reduce: with a gathered operand XLA:CPU fused that into a
        # loop 10x slower (at the reference shape, 32 rows: 6.1 ms per layer and step against 0.53 ms).
        prompt_scores = mm("bkqm,bkmn->bkqn", q, prompt_k[prompt_rows], dtype)
        prompt_out = lambda p: mm("bkqm,bkmn->bkqn", p, prompt_v[prompt_rows], dtype)
    scores = jnp.concatenate([prompt_scores, bmm(q, k, dtype)], axis=-1) / math.sqrt(Dh)
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, NEG_INF), axis=-1)
    return prompt_out(probs[..., :P]) + bmm(probs[..., P:], v, dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, _param(self, "scale", (x.shape[-1],), (self.axis_name,), None), self.eps)


class Block(nn.Module):
    """One pre-norm decoder layer. Returns the new residual stream and the updated layer cache (without a
    cache: this call's keys and values).

    Keys are kept as [B, K, Dh, S] and values as [B, K, S, Dh], with or without a cache: both attention
    contractions then read their operand in the layout XLA:CPU's matmul wants, which made single-token
    decode attention 6x faster than the [B, S, K, Dh] layout (it was transposed on every step).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, angles, mask, cache=None, write_index=0, prompt=None):
        """angles: (cos, sin) of the tokens' positions (`rope`). prompt: None, or a pair (this layer's keys and
        values of a shared prompt {'k', 'v'}, prompt_rows), and `mask` then covers the prompt slots first:
        with a cache, decoding over the prompt cache (see `attention_over_prompt`); without one, a full pass
        whose rows continue the prompts (the update's responses), each row attending over its prompt's keys,
        gathered, and then its own.
        Returns (x, the updated cache), or without a cache (x, this call's keys and values {'k', 'v'})."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        x = pin_rows(x)

        # ---- attention
        h = RMSNorm(cfg.norm_eps, name="attn_norm")(x)
        if self.has_variable("params", "qkv"):  # decode weights, `unstack_layers(..., fuse_qkv=True)`
            qkv = mm("btd,de->bte", h, self.get_variable("params", "qkv"), dt)
            if cfg.qkv_bias:
                qkv = qkv + self.get_variable("params", "qkv_bias")
            q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], H + 2 * K, Dh), [H, H + K], axis=2)
        else:
            q = mm("btd,dhk->bthk", h, _param(self, "q", (D, H, Dh), ("embed", "heads", "head_dim"), D), dt)
            k = mm("btd,dhk->bthk", h, _param(self, "k", (D, K, Dh), ("embed", "kv_heads", "head_dim"), D), dt)
            v = mm("btd,dhk->bthk", h, _param(self, "v", (D, K, Dh), ("embed", "kv_heads", "head_dim"), D), dt)
            if cfg.qkv_bias:
                q = q + _param(self, "q_bias", (H, Dh), ("heads", "head_dim"), 0)
                k = k + _param(self, "k_bias", (K, Dh), ("kv_heads", "head_dim"), 0)
                v = v + _param(self, "v_bias", (K, Dh), ("kv_heads", "head_dim"), 0)
        if cfg.qk_norm:
            q = RMSNorm(cfg.norm_eps, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, "head_dim", name="k_norm")(k)
        q, k = apply_rope(q, *angles), apply_rope(k, *angles)
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, Dh, T], [B, K, T, Dh]
        own = {"k": k, "v": v}

        if cache is None and prompt is not None:
            # The prompt's keys and values come from one pass per prompt (tsched.model.prompt_kv), not one
            # per row: the gather's gradient sums every row's share back onto its prompt.
            (pkv, rows), prompt = prompt, None
            k = jnp.concatenate([pkv["k"][rows], k], axis=-1)
            v = jnp.concatenate([pkv["v"][rows], v], axis=-2)
        elif cache is not None:
            # Write this call's keys/values at `write_index` and attend over every slot; `mask` hides
            # slots not written yet. The sampler carries the cache through its loop, so this is in place.
            write = lambda c, x, at: jax.lax.dynamic_update_slice(c, to_cache(x, c.dtype), at)
            cache = {"k": write(cache["k"], k, (0, 0, 0, write_index)),
                     "v": write(cache["v"], v, (0, 0, write_index, 0))}
            k, v = from_cache(cache["k"]), from_cache(cache["v"])
        # Queries as [B, K, G*T, Dh]: both contractions are then plain batched matmuls (XLA:CPU has no
        # bf16 x bf16 -> f32 kernel for some 5-d dot layouts, and these need no transposes of the cache).
        B, T, G = q.shape[0], q.shape[1], H // K
        q = q.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
        if prompt is not None:
            (pc, prompt_rows) = prompt
            o = attention_over_prompt(q, from_cache(pc["k"]), from_cache(pc["v"]), k, v, mask, prompt_rows, dt)
        elif cache is None and cfg.attn_block:
            o = attention_blockwise(q, k, v, mask, dt, cfg.attn_block)
        else:
            o = attention(q, k, v, mask, dt)
        o = o.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
        wo = _param(self, "o", (H, Dh, D), ("heads", "head_dim", "embed"), H * Dh, out_scale)
        x = x + mm("bthk,hkd->btd", o, wo, dt)

        # ---- SwiGLU MLP
        h = RMSNorm(cfg.norm_eps, name="mlp_norm")(x)
        gate = mm("btd,df->btf", h, _param(self, "gate", (D, F), ("embed", "mlp"), D), dt)
        up = mm("btd,df->btf", h, _param(self, "up", (D, F), ("embed", "mlp"), D), dt)
        # down is stored [D, F] (as in HF): its weight gradient then transposes the small [T, D] cotangent
        # rather than the [T, F] activation (see _einsum_bwd).
        x = x + mm("btf,df->btd", jax.nn.silu(gate) * up,
                   _param(self, "down", (D, F), ("embed", "mlp"), F, out_scale, draw_transposed=True), dt)
        return pin_rows(x), own if cache is None else cache


def unembed(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Output projection of the final-normed residual stream x [B, T, D] -> logits [B, T, V] float32."""
    if cfg.tie_embeddings:
        return mm("btd,vd->btv", x, params["embedding"], cfg.compute_dtype)
    return mm("btd,dv->btv", x, params["lm_head"], cfg.compute_dtype)


class Decoder(nn.Module):
    """Defines the (stacked) parameters: `tsched.model.init_params` runs this causal pass once, layers under
    `nn.scan`. Passes over given parameters go through `full_pass` and `hidden_unrolled`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask):
        """tokens, positions [B, T]; mask [B, T, T] bool -> logits [B, T, V] float32."""
        cfg = self.cfg
        params = {"embedding": _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1,
                                      0.02)}
        x = jnp.take(params["embedding"], tokens, axis=0)
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(cfg, name="layers")(x, rope(cfg, positions), mask)
        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if not cfg.tie_embeddings:
            params["lm_head"] = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model)
        return unembed(cfg, params, x)


def unstack_layers(params: Params, fuse_qkv: bool = False) -> Params:
    """params with 'layers' split from one stacked tree [L, ...] into a tuple of L per-layer trees.

    The sampler does this once before its decode loop: per-layer weights and caches are separate
    buffers, so a decode step neither slices the stacked weights nor re-stacks the cache. fuse_qkv: each
    layer's q, k, v (and their biases) joined into one 'qkv' [D, (H + 2K) * Dh] ('qkv_bias'), which `Block`
    runs as one matmul: at decode sizes XLA:CPU ran the three single-threaded, the joined one on every
    core (136 against ~200 us per layer and step at the bench's reference shape).
    """
    layers = dict(params["layers"])
    if fuse_qkv:  # [L, D, N, Dh] weights and [L, N, Dh] biases joined along N * Dh
        join = lambda names: jnp.concatenate([(p := layers.pop(n)).reshape(*p.shape[:-2], -1) for n in names], -1)
        layers["qkv"] = join(("q", "k", "v"))
        if "q_bias" in layers:
            layers["qkv_bias"] = join(("q_bias", "k_bias", "v_bias"))
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda p: p[i], layers) for i in range(n_layers))}


def full_pass(cfg: ModelConfig, params: Params, tokens, positions, mask, prompt=None):
    """The decoder up to the final norm over all tokens at once (training, scoring), on the stacked
    parameters of `Decoder.init`: layers under `lax.scan` with `cfg.scan_layers` (compile time independent
    of depth), else unrolled (faster on CPU: no stacked residual buffers).

    tokens, positions [B, T]; mask [B, T, S] bool, S = T, or P + T after a shared prompt. prompt: None, or
    (the prompts' keys and values stacked over layers {'k': [L, Bp, K, Dh, P], 'v': [L, Bp, K, P, Dh]}, as
    this function returns them for the prompts, rows [B] the prompt of each row). Returns (final-normed
    hidden states [B, T, D] float32, this pass's keys and values {'k': [L, B, K, Dh, T], 'v': [L, B, K, T, Dh]};
    unused ones cost nothing, XLA drops them).
    """
    x = jnp.take(params["embedding"], tokens, axis=0)
    block = (nn.remat(Block, prevent_cse=False) if cfg.remat else Block)(cfg)
    rows = None if prompt is None else prompt[1]
    angles = rope(cfg, positions)

    def layer(x, layer_params, layer_prompt):
        return block.apply({"params": layer_params}, x, angles, mask,
                           prompt=None if layer_prompt is None else (layer_prompt, rows))

    prompt_kv = None if prompt is None else prompt[0]
    if cfg.scan_layers:
        x, kv = jax.lax.scan(lambda x, layer_in: layer(x, *layer_in), x, (params["layers"], prompt_kv))
    else:
        kvs = []
        for i in range(jax.tree.leaves(params["layers"])[0].shape[0]):
            at = lambda tree: jax.tree.map(lambda a: a[i], tree)
            x, layer_kv = layer(x, at(params["layers"]), None if prompt_kv is None else at(prompt_kv))
            kvs.append(layer_kv)
        kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs)
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps), kv


def apply_unrolled(cfg: ModelConfig, params: Params, tokens, positions, mask, cache, write_index=0, prompt=None,
                   angle_table=None):
    """`hidden_unrolled` followed by `unembed`: (logits [B, T, V] float32, updated cache)."""
    x, cache = hidden_unrolled(cfg, params, tokens, positions, mask, cache, write_index, prompt, angle_table)
    return unembed(cfg, params, x), cache


def hidden_unrolled(cfg: ModelConfig, params: Params, tokens, positions, mask, cache, write_index=0, prompt=None,
                    angle_table=None):
    """Cached decoding (the sampler's prefill and decode steps), with layers unrolled in Python over
    `params` from `unstack_layers`.

    tokens, positions [B, T]; mask [B, T, S] bool; the tokens are written at slot `write_index` of a cache
    that is a tuple over layers of {'k': [B, K, Dh, S], 'v': [B, K, S, Dh]}. Returns (final-normed hidden
    states [B, T, D], updated cache). prompt: None, or (prompt cache, prompt_rows) for decoding over a
    shared prompt cache (tuple over layers like `cache`; see `attention_over_prompt`). angle_table: None, or a
    `rope_table` covering the positions, to look the rotary angles up in.
    Every layer's cache is its own loop-carried buffer, updated in place, where `nn.scan` would slice
    and re-stack the whole cache on every token.
    """
    x = jnp.take(params["embedding"], tokens, axis=0)
    block = (nn.remat(Block, prevent_cse=False) if cfg.remat else Block)(cfg)
    prompts = [None] * len(cache) if prompt is None else [(pc, prompt[1]) for pc in prompt[0]]
    angles = rope(cfg, positions, angle_table)
    new_cache = []
    for layer_params, layer_cache, layer_prompt in zip(params["layers"], cache, prompts, strict=True):
        x, layer_cache = block.apply({"params": layer_params}, x, angles, mask, layer_cache, write_index,
                                     layer_prompt)
        new_cache.append(layer_cache)
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps), tuple(new_cache)
