"""The sampler: one jitted prefill of the prompts, then jitted `lax.while_loop` decode chunks over a KV cache.

No Python runs per token. Prompts arrive left-padded to P tokens and are prefilled once each: the G
samples of a prompt (rows b*G .. b*G+G-1) attend over that one prompt cache, shared, plus a cache of their
own generated tokens (token i of every row goes to slot i of it), with one softmax over both parts
(`decoder.attention_over_prompt`). A row stops at the first of its stop ids (`eos_id`: one id or a tuple,
e.g. Qwen's `<|im_end|>` and `<|endoftext|>`, compared in one vectorised test per step) or at its cap
(`max_new_per_row`), and writes padding after.

The decode runs in chunks of at most DECODE_CHUNK steps; between chunks the host reads which rows are still
running, and when they fit a smaller power-of-two bucket, the running rows are gathered into it: rows that
stopped stop costing. Bucket sizes and the widths of the own caches (up to WINDOW_CHUNKS growing attention
windows of at least MIN_WINDOW slots, so attention reads only the slots a chunk can have written) are static
shapes, each compiled once. Randomness is per row and step (`fold_in(fold_in(rng, row), step)`), so a row's
tokens do not depend on which rows share its batch: equal keys give equal outputs with or without
compaction. The stacked layer weights are split per layer once per call (`unstack_layers`, one extra copy of
the weights while sampling; off a mesh with each layer's q, k, v joined into one matmul), so a decode step
reads each layer's weights and cache where they are and updates the cache in place; the decode state is
donated from chunk to chunk. On a mesh that copy is tensor-parallel whatever the training layout
(`sharding.decode_layout`), so decoding never all-gathers weights, and the prompts go through in passes of
`prompts_per_pass` to bound the caches.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from tsched import model as model_lib
from tsched import multihost, sharding
from tsched.model import ModelConfig
from tsched.model.decoder import COMPUTE_DTYPES

WINDOW_CHUNKS = 4  # own-cache widths T/4, T/2, ...: attention windows that grow with the generated length
# Windows are at least this many slots wide: below it a narrower window saves less attention than the
# decode compilation it costs (one per window and bucket), so short budgets decode in one window.
MIN_WINDOW = 32
DECODE_CHUNK = 16  # decode steps between the host's checks for finished rows (and batch compaction)
# The smallest compacted batch: below ~8 rows a decode step costs about the same as at 8 (it is bound
# by reading the weights), and every bucket size is one more compilation per window.
MIN_BUCKET = 8
CACHE_DTYPES = ("auto", *COMPUTE_DTYPES)  # `rl.cache_dtype`; auto = the model's compute dtype


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    eos_id: int | tuple[int, ...]  # the stop id(s): a row ends at the first of them; normalised to a tuple
    pad_id: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_samples: int = 1  # G samples per prompt
    cache_dtype: str = "auto"  # KV cache values: auto (the compute dtype) or one of COMPUTE_DTYPES
    # Prompts per pass of the sampler, 0 = all at once: the KV caches of one pass are what must fit (a 4B
    # model at 4k new tokens: 4 prompts x 8 samples per pass on a v5e-8). Passes give the tokens of one pass.
    prompts_per_pass: int = 0

    def __post_init__(self):
        ids = (int(self.eos_id),) if isinstance(self.eos_id, numbers.Integral) else tuple(int(i) for i in self.eos_id)
        object.__setattr__(self, "eos_id", ids)  # hashable: the config is a static argument of the jitted parts
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype {self.cache_dtype!r} must be one of {list(CACHE_DTYPES)}")

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


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum) as two plain reductions: XLA:CPU's argmax, a
    reduction over (value, index) pairs, took 9x longer ([64, 512]: 0.38 ms, about 10% of a decode step)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def _next_token(logits: jax.Array, keys: jax.Array, scfg: SamplingConfig):
    """Samples from logits [N, V] with one key per row [N]; returns (token [N], its log-prob under
    logits / temperature [N])."""
    if scfg.temperature == 0:
        tok = _argmax(logits)
        return tok, jnp.zeros(tok.shape, jnp.float32)
    scaled = logits / scfg.temperature
    # Gumbel-max, as jax.random.categorical draws it (same noise for the same key), with the fast argmax.
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
    tok = _argmax(filter_logits(scaled, scfg.top_k, scfg.top_p) + noise)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, logp


def _pin_cache(cache, mesh):
    """Per-layer caches ({'k': [n, K, Dh, S], 'v': [n, K, S, Dh]}) split as the attention that reads them
    (`sharding.decode_layout`): rows over 'data', KV heads over ('fsdp', 'tensor')."""
    return tuple({k: sharding.constrain(c[k], mesh, sharding.DECODE_ROWS, ("fsdp", "tensor")) for k in c}
                 for c in cache)


def _pin_state(state, mesh):
    """The decode state with its per-row arrays split by rows over 'data' and the caches by `_pin_cache`."""
    rows = {k: sharding.constrain(v, mesh, sharding.DECODE_ROWS) for k, v in state.items() if k not in ("i", "cache")}
    return {**state, **rows, "cache": _pin_cache(state["cache"], mesh)}


def _decode_weights(cfg: ModelConfig, params, mesh):
    """The per-layer weights the decode reads (`unstack_layers`): off a mesh with q, k, v joined, on one
    tensor-parallel (`sharding.DECODE_RULES`), heads split as the caches."""
    if mesh is None:
        return model_lib.unstack_layers(params, fuse_qkv=True)
    layers = model_lib.unstack_layers(params)
    specs = model_lib.logical_axes(cfg)
    specs = {**specs, "layers": tuple(jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s[1:]), specs["layers"],
                                                   is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
                                      for _ in layers["layers"])}
    return jax.lax.with_sharding_constraint(layers, sharding.logical_to_sharding(specs, mesh, sharding.DECODE_RULES))


@sharding.traced_in(sharding.decode_layout)
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prefill(cfg: ModelConfig, scfg: SamplingConfig, width: int, mesh, params, prompts, prompt_lens, caps):
    """The prompts' caches and the initial decode state of all N = B * G rows (own caches `width` slots
    wide, the first window). `mesh` (static; None off a mesh) pins the caches and the state (`_pin_state`)."""
    B, P = prompts.shape
    G = scfg.num_samples
    pad_len = P - prompt_lens
    slots = jnp.arange(P)
    valid = slots[None] >= pad_len[:, None]  # [B, P]
    mask = (slots[None, :, None] >= slots[None, None, :]) & valid[:, None, :]
    positions = jnp.maximum(slots[None] - pad_len[:, None], 0) * valid
    layers = _decode_weights(cfg, params, mesh)
    value_dtype = None if scfg.cache_dtype == "auto" else scfg.cache_dtype
    logits, cache = model_lib.apply_unrolled(cfg, layers, prompts, positions, mask,
                                             model_lib.init_cache(cfg, B, P, value_dtype), 0)
    N, T = B * G, scfg.max_new_tokens
    prompt = {"cache": _pin_cache(cache, mesh), "valid": valid, "lens": prompt_lens,
              "rope": model_lib.decoder.rope_table(cfg, P + T)}
    state = {"i": jnp.int32(0), "rows": jnp.arange(N, dtype=jnp.int32),
             "cache": model_lib.init_cache(cfg, N, width, value_dtype),
             "last": jnp.repeat(logits[:, -1], G, axis=0), "done": caps <= 0,
             "tokens": jnp.full((N, T), scfg.pad_id, jnp.int32), "logp": jnp.zeros((N, T), jnp.float32),
             "lengths": jnp.zeros(N, jnp.int32)}
    return layers, prompt, _pin_state(state, mesh)


@sharding.traced_in(sharding.decode_layout)
@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def _decode(cfg: ModelConfig, scfg: SamplingConfig, mesh, layers, prompt, state, caps, rng, first_row, stop):
    """Decode steps state['i'] .. stop - 1 (fewer if every row stops) for the rows of the state's bucket.

    Bucket state (n rows): rows [n] (their ids), cache (own, per layer), last [n, V] (next-token logits),
    done [n]; for all N rows: tokens, logp [N, T], lengths [N] (scattered to by row id). Row r draws its
    randomness from `first_row + r` (see `sample`).
    """
    N = state["tokens"].shape[0]
    G = scfg.num_samples
    stop_ids = jnp.asarray(scfg.stop_ids or (-1,), jnp.int32)  # [S]; () stops only at the caps
    # All N rows in order read their prompt cache as one matmul per prompt; a compacted bucket gathers.
    prompt_rows = None if state["rows"].shape[0] == N else state["rows"] // G

    def body(st):
        i, rows, done = st["i"], st["rows"], st["done"]
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, first_row + r), i))(rows)
        tok, logp = _next_token(st["last"], keys, scfg)
        tok = jnp.where(done, scfg.pad_id, tok).astype(jnp.int32)
        logp = jnp.where(done, 0.0, logp)
        lengths = st["lengths"].at[rows].add((~done).astype(jnp.int32))
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1) | (lengths[rows] >= caps[rows])
        group = rows // G
        own = jnp.arange(st["cache"][0]["v"].shape[2]) <= i
        mask = jnp.concatenate([prompt["valid"][group], jnp.broadcast_to(own, (rows.shape[0], own.shape[0]))], 1)
        logits, cache = model_lib.apply_unrolled(cfg, layers, tok[:, None], (prompt["lens"][group] + i)[:, None],
                                                 mask[:, None], st["cache"], i, (prompt["cache"], prompt_rows),
                                                 prompt["rope"])
        return {"i": i + 1, "rows": rows, "cache": cache, "last": logits[:, 0], "done": done,
                "tokens": st["tokens"].at[rows, i].set(tok), "logp": st["logp"].at[rows, i].set(logp),
                "lengths": lengths}

    return jax.lax.while_loop(lambda st: (st["i"] < stop) & ~jnp.all(st["done"]), body, _pin_state(state, mesh))


@sharding.traced_in(sharding.decode_layout)
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _resize(n: int, width: int, mesh, state):
    """The bucket state with its running rows first (in row order), cut to n rows, own caches widened
    to `width` slots."""
    keep = jnp.argsort(state["done"], stable=True)[:n]
    take = lambda x: x[keep] if n < x.shape[0] else x
    widen = lambda c, axis: jnp.pad(take(c), [(0, width - c.shape[axis]) if a == axis else (0, 0) for a in range(4)])
    cache = tuple({"k": widen(c["k"], 3), "v": widen(c["v"], 2)} for c in state["cache"])
    return _pin_state({**state, "rows": take(state["rows"]), "cache": cache, "last": take(state["last"]),
                       "done": take(state["done"])}, mesh)


def _windows(T: int) -> list[int]:
    C = max(1, min(WINDOW_CHUNKS, T // MIN_WINDOW))
    return sorted({-(-T * (c + 1) // C) for c in range(C)})


def _bucket(running: int, n: int) -> int:
    """The batch size for `running` rows out of a bucket of n: the next power of two, if smaller than n."""
    b = max(MIN_BUCKET, 1 << max(running - 1, 0).bit_length())
    return b if b < n else n


def sample(cfg: ModelConfig, scfg: SamplingConfig, params, prompts: jax.Array, prompt_lens: jax.Array,
           rng: jax.Array, max_new_per_row: jax.Array | None = None) -> dict:
    """prompts [B, P] (left-padded), prompt_lens [B] -> completions for N = B * G rows.

    max_new_per_row: optional int32 [N], each row's cap on new tokens (<= max_new_tokens; a row ends at
    its cap as at a stop id, with no stop id written).
    Returns tokens [N, T] (the stop id included, padding after), lengths [N] (tokens up to and including
    the stop id), logp [N, T] (log-prob of each sampled token at the sampling temperature before top-k /
    top-p filtering, as the learner computes it; 0 on padding): the RL step's `logp_mismatch` compares
    them; and row_steps (int): the rows decoded summed over steps, what the decode cost follows.

    The prompts go through in passes of `scfg.prompts_per_pass`; row r of the batch draws its randomness
    as row r whatever pass it is in, so the tokens do not depend on the pass size. With `params` on a mesh
    the decode runs in `sharding.decode_layout`: weights and KV caches split by heads over ('fsdp',
    'tensor') (keep the KV heads a multiple of that product, or the caches are replicated), rows over 'data'.
    """
    B, G = prompts.shape[0], scfg.num_samples
    step = scfg.prompts_per_pass or B
    caps = jnp.full((B * G,), scfg.max_new_tokens, jnp.int32) if max_new_per_row is None else jnp.asarray(
        max_new_per_row, jnp.int32)
    outs = [_sample_pass(cfg, scfg, params, prompts[s:s + step], prompt_lens[s:s + step], rng,
                         caps[s * G:(s + step) * G], s * G) for s in range(0, B, step)]
    if len(outs) == 1:
        return outs[0]
    cat = lambda k: jnp.concatenate([o[k] for o in outs])
    return {"tokens": cat("tokens"), "lengths": cat("lengths"), "logp": cat("logp"),
            "row_steps": sum(o["row_steps"] for o in outs)}


def _sample_pass(cfg: ModelConfig, scfg: SamplingConfig, params, prompts, prompt_lens, rng, caps, first_row: int):
    """One pass of `sample` over prompts [b, P]; caps [b * G]; its rows draw randomness as first_row + r."""
    N, T = caps.shape[0], scfg.max_new_tokens
    windows = _windows(T)
    mesh = sharding.mesh_of(params)
    layers, prompt, state = _prefill(cfg, scfg, windows[0], mesh, params, prompts, prompt_lens, caps)
    i, n, row_steps, running = 0, N, 0, N
    for width in windows:
        if not running:
            break
        if state["cache"][0]["v"].shape[2] < width:
            state = _resize(n, width, mesh, state)
        while running and i < width:
            state = _decode(cfg, scfg, mesh, layers, prompt, state, caps, rng, jnp.int32(first_row),
                            jnp.int32(min(i + DECODE_CHUNK, width)))
            done, step = multihost.fetch((state["done"], state["i"]))  # rows of every process
            row_steps += n * (int(step) - i)
            i, running = int(step), int(np.sum(~done))
            if running and _bucket(running, n) < n:
                n = _bucket(running, n)
                state = _resize(n, state["cache"][0]["v"].shape[2], mesh, state)
    return {"tokens": state["tokens"], "lengths": state["lengths"], "logp": state["logp"], "row_steps": row_steps}
