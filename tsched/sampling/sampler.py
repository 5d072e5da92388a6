"""The jitted sampler: one prefill over the prompts, then a `lax.while_loop` decode over a KV cache.

No Python runs per token. Prompts arrive left-padded to P tokens, so every row's next token goes to the
same cache slot P + i at decode step i; a row stops at the first of its stop ids (`eos_id`: one id or
a tuple, e.g. Qwen's `<|im_end|>` and `<|endoftext|>`, compared in one vectorised test per step) and
keeps writing padding until all rows are done or `max_new_tokens` is reached. The loop runs as WINDOW_CHUNKS while-loops whose caches (and so
attention windows) grow with the generated length. The prompt is prefilled once and its cache repeated
G times for the G samples of a group (rows b*G .. b*G+G-1 belong to prompt b). The stacked layer weights are
split per layer once before the loop (`unstack_layers`, one extra copy of the weights while sampling),
so a decode step reads each layer's weights and cache where they are and updates the cache in place.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from tsched import model as model_lib
from tsched.model import ModelConfig

WINDOW_CHUNKS = 4  # decode-loop chunks with growing attention windows (compile time grows with it)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    eos_id: int | tuple[int, ...]  # the stop id(s): a row ends at the first of them; normalised to a tuple
    pad_id: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_samples: int = 1  # G samples per prompt

    def __post_init__(self):
        ids = (int(self.eos_id),) if isinstance(self.eos_id, numbers.Integral) else tuple(int(i) for i in self.eos_id)
        object.__setattr__(self, "eos_id", ids)  # hashable: the config is a static argument of `sample`

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_id


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf; logits [..., V]."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept if the mass strictly before it is below top_p, so the top token always is.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _next_token(logits: jax.Array, key: jax.Array, scfg: SamplingConfig):
    """Samples from logits [N, V]; returns (token [N], its log-prob under logits / temperature [N])."""
    if scfg.temperature == 0:
        tok = jnp.argmax(logits, axis=-1)
        return tok, jnp.zeros(tok.shape, jnp.float32)
    scaled = logits / scfg.temperature
    tok = jax.random.categorical(key, filter_logits(scaled, scfg.top_k, scfg.top_p), axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, logp


@functools.partial(jax.jit, static_argnums=(0, 1))
def sample(cfg: ModelConfig, scfg: SamplingConfig, params, prompts: jax.Array, prompt_lens: jax.Array,
           rng: jax.Array) -> dict:
    """prompts [B, P] (left-padded), prompt_lens [B] -> completions for N = B * G rows.

    Returns tokens [N, T] (the stop id included, padding after), lengths [N] (tokens up to and including
    the stop id), logp [N, T] (log-prob of each sampled token at the sampling temperature before top-k /
    top-p filtering, as the learner computes it; 0 on padding): the RL step's `logp_mismatch` compares them.
    """
    B, P = prompts.shape
    G, T = scfg.num_samples, scfg.max_new_tokens
    # The decode loop runs in chunks whose caches end at P + ends[c]: attention reads only the slots a
    # chunk can have written, not all P + T (at P = T/2 this reads a quarter fewer keys and values).
    C = min(WINDOW_CHUNKS, T)
    ends = sorted({-(-T * (c + 1) // C) for c in range(C)})

    # ---- prefill the prompts once
    pad_len = P - prompt_lens  # [B]
    slots = jnp.arange(P + ends[0])
    valid = slots[None, :P] >= pad_len[:, None]  # [B, P]
    mask = (slots[None, :P, None] >= slots[None, None, :]) & (slots[None, None, :] >= pad_len[:, None, None])
    positions = jnp.maximum(slots[None, :P] - pad_len[:, None], 0) * valid
    params = model_lib.unstack_layers(params)
    cache = model_lib.init_cache(cfg, B, P + ends[0])
    logits, cache = model_lib.apply_unrolled(cfg, params, prompts, positions, mask, cache, 0)

    # ---- G copies of every prompt's cache and last logits
    cache = jax.tree.map(lambda c: jnp.repeat(c, G, axis=0), cache)
    last = jnp.repeat(logits[:, -1], G, axis=0)  # [N, V]
    pad_len = jnp.repeat(pad_len, G)
    N = B * G
    stop_ids = jnp.asarray(scfg.stop_ids or (-1,), jnp.int32)  # [S]; () stops only at max_new_tokens

    def body(state):
        i, cache, last, done, lengths, tokens, logps = state
        tok, logp = _next_token(last, jax.random.fold_in(rng, i), scfg)
        tok = jnp.where(done, scfg.pad_id, tok).astype(jnp.int32)
        logp = jnp.where(done, 0.0, logp)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, logp[:, None], (0, i))
        slot = P + i
        slots = jnp.arange(cache[0]["v"].shape[2])
        step_mask = ((slots <= slot)[None, :] & (slots[None, :] >= pad_len[:, None]))[:, None, :]
        logits, cache = model_lib.apply_unrolled(cfg, params, tok[:, None], (slot - pad_len)[:, None], step_mask,
                                                 cache, slot)
        return i + 1, cache, logits[:, 0], done, lengths, tokens, logps

    state = (jnp.int32(0), cache, last, jnp.zeros(N, bool), jnp.zeros(N, jnp.int32),
             jnp.full((N, T), scfg.pad_id, jnp.int32), jnp.zeros((N, T), jnp.float32))
    for c, end in enumerate(ends):
        if c:  # widen the cache to this chunk's window (one copy per chunk)
            grow = end - ends[c - 1]
            widen = lambda layer, n=grow: {"k": jnp.pad(layer["k"], ((0, 0), (0, 0), (0, 0), (0, n))),
                                           "v": jnp.pad(layer["v"], ((0, 0), (0, 0), (0, n), (0, 0)))}
            state = (state[0], tuple(map(widen, state[1])), *state[2:])
        state = jax.lax.while_loop(lambda st, end=end: (st[0] < end) & ~jnp.all(st[3]), body, state)
    _, _, _, _, lengths, tokens, logps = state
    return {"tokens": tokens, "lengths": lengths, "logp": logps}
