"""The Llama / Qwen family decoder in Flax linen, with logical axis names on every parameter.

RMSNorm, rotary embeddings (optionally llama3-scaled), grouped-query attention with an optional KV cache,
optional q/k RMSNorm (Qwen3) and qkv bias (Qwen2), SwiGLU MLP, tied or untied embeddings. Layers are
stacked on a leading 'layers' axis and run under `nn.scan`, so compile time does not grow with depth.

Compute dtype: weights are float32 masters; with `dtype='bfloat16'` matmul inputs are cast to bf16 and
accumulate in float32 (`preferred_element_type`), which is also the fast path of CPUs with avx512_bf16.
The residual stream, norms, softmax and logits stay float32.

Shapes: B batch, T query tokens, S key slots (= T without a cache), D d_model, H query heads,
K kv heads, G = H // K, Dh head_dim, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give a uniform softmax, never NaN


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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, N, Dh] rotated by positions [B, T] (rotate-half convention of HF Llama / Qwen)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mm(eq: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum with inputs cast to the compute dtype and float32 accumulation."""
    return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, fan_in: int | None, scale: float = 1.0):
    """A float32 parameter with logical axes; fan_in None = ones (norm scales), 0 = zeros (biases)."""
    if fan_in is None:
        init = nn.initializers.ones
    elif fan_in == 0:
        init = nn.initializers.zeros
    else:
        init = nn.initializers.normal(scale / math.sqrt(fan_in))
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), None)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class Block(nn.Module):
    """One pre-norm decoder layer. Returns the new residual stream and the updated layer cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cache, positions, mask, write_index):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)

        # ---- attention
        h = RMSNorm(cfg.norm_eps, name="attn_norm")(x)
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
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        if cache is not None:
            # Write this call's keys/values at `write_index` and attend over every slot; `mask` hides
            # slots not written yet. The cache is donated by the sampler, so this update is in place.
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, write_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, write_index, 0, 0))
            cache = {"k": k, "v": v}
        B, T = q.shape[:2]
        q = q.reshape(B, T, K, H // K, Dh)
        scores = mm("btkgd,bskd->bkgts", q, k, dt) / math.sqrt(Dh)
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        o = mm("bkgts,bskd->btkgd", probs, v, dt).reshape(B, T, H, Dh)
        wo = _param(self, "o", (H, Dh, D), ("heads", "head_dim", "embed"), H * Dh, out_scale)
        x = x + mm("bthk,hkd->btd", o, wo, dt)

        # ---- SwiGLU MLP
        h = RMSNorm(cfg.norm_eps, name="mlp_norm")(x)
        gate = mm("btd,df->btf", h, _param(self, "gate", (D, F), ("embed", "mlp"), D), dt)
        up = mm("btd,df->btf", h, _param(self, "up", (D, F), ("embed", "mlp"), D), dt)
        x = x + mm("btf,fd->btd", jax.nn.silu(gate) * up,
                   _param(self, "down", (F, D), ("mlp", "embed"), F, out_scale), dt)
        return x, cache


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask, cache=None, write_index=0):
        """tokens, positions [B, T]; mask [B, T, S] bool; cache {'k','v': [L, B, S, K, Dh]} or None.

        Returns (logits [B, T, V] float32, updated cache or None).
        """
        cfg = self.cfg
        emb = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1, 0.02)
        x = jnp.take(emb, tokens, axis=0)
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, cache = layers(cfg, name="layers")(x, cache, positions, mask, write_index)
        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = mm("btd,vd->btv", x, emb, cfg.compute_dtype)
        else:
            head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model)
            logits = mm("btd,dv->btv", x, head, cfg.compute_dtype)
        return logits, cache
