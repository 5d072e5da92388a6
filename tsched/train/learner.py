"""The update steps, each one pure jitted function of (state, batch): SFT and the scheduled RL update.

The RL update is where the paper's idea lives: `r = schedule(step)` is computed from the traced step
counter, the credit criterion turns it into a token mask / token advantages, and PPO-clip or GSPO with
the configured aggregation gives the loss, all inside one `jax.jit` that compiles once for every step.

State (everything a resume needs besides the data iterator): {'params', 'opt_state', 'step', 'rng'}.
`state['step']` is the one step counter of a run: the update computes the schedule at
`state['step'] + 1` (the paper's counter starts at 1), and the trainer derives the same number from
the state for sampling keys, prompt transforms, logs and checkpoints.
Layout of a batch: prompts [B, P] left-padded, completions [N, T] right-padded, N = B * G. The update's
cost follows the real tokens (`policy_gradient`): each prompt runs once for its G rows, its responses are
packed into shared rows, and the packed rows run in micro-batches of similar fill, each at a bucketed shape
(`rl.length_buckets`) that holds them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from tsched import model as model_lib
from tsched import sharding
from tsched.rl import advantages as adv_lib
from tsched.rl import objective, schedules


def make_optimizer(lr: float, max_grad_norm: float, warmup_steps: int = 0, total_steps: int = 0):
    """AdamW after global-norm clipping. With warmup_steps the rate rises linearly from 0 (optax's count from
    0) to lr over them; with total_steps as well it then follows a cosine to lr / 10 at total_steps (SFT),
    else it stays at lr (RL: a fresh Adam's first updates are about lr x sign(g) for every parameter,
    before its second moments settle)."""
    if warmup_steps and total_steps:
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), lr * 0.1)
    elif warmup_steps:
        lr = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr, b1=0.9, b2=0.99,
                                                                            weight_decay=0.0))


def init_state(params, tx, rng=None) -> dict:
    """rng: a PRNG key; kept as raw key data so the state is a plain array pytree for Orbax. The state
    lives on the parameters' mesh (so the jitted steps see one set of input shardings and compile once)."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    if rng is not None:
        state["rng"] = jax.random.key_data(rng)
    return sharding.colocate(state, params)


def state_shardings(model_cfg, tx, mesh, with_rng: bool = True) -> dict:
    """Shardings of `init_state`'s pytree on `mesh`: parameters by their logical axes (tsched.sharding),
    Adam's moments like the parameters they belong to, counters and the key replicated."""
    param_sh = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh)
    params = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
    abstract = jax.eval_shape(lambda p: init_state(p, tx, jax.random.key(0) if with_rng else None), params)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, sh: sh, abstract["opt_state"], param_sh, transform_non_params=lambda _: rep)
    return {**jax.tree.map(lambda _: rep, abstract), "params": param_sh, "opt_state": opt}


def _jit_step(fn, model_cfg, tx, mesh, args, with_rng: bool):
    """`fn(state, *args)` jitted with its state donated and, on a mesh, explicit shardings: the state's
    (`state_shardings`) in and out, batch arrays split by rows (`args` names each further argument:
    'batch', 'params' or None for an absent one), metrics replicated. Arguments placed otherwise are an
    error, not a silent reshard."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    st = state_shardings(model_cfg, tx, mesh, with_rng)
    kinds = {"batch": sharding.batch_sharding(mesh), "params": st["params"], None: None}
    return jax.jit(fn, donate_argnums=0, in_shardings=(st, *(kinds[a] for a in args)),
                   out_shardings=(st, sharding.replicated(mesh)))


def step_keys(rng_data, step):
    """(sampling key, loss key) of a step: both functions of the state's RNG and the step counter, so a
    resumed run draws the same numbers."""
    sample_key, loss_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step))
    return sample_key, loss_key


def join(prompts, prompt_lens, completions, lengths):
    """-> tokens [N, P+T], valid [N, P+T], response_mask [N, T]: each row with its prompt in front (SFT;
    the RL update runs each prompt once instead, `split_batch`)."""
    prompt, rows = split_batch(prompts, prompt_lens, completions, lengths)
    group, mask = rows["group"], rows["mask"]
    return (jnp.concatenate([prompt["tokens"][group], completions], axis=1),
            jnp.concatenate([prompt["valid"][group], mask], axis=1), mask)


def token_stats(model_cfg, params, tokens, valid, P: int, temperature: float = 1.0):
    """tokens, valid [N, P+T] -> log-prob of each completion token and its entropy [N, T], at `temperature`.

    With `model_cfg.logits_chunk` > 0 the [N, T, V] logits are never held whole (tsched.model.logits).
    """
    h = model_lib.hidden_states(model_cfg, params, tokens, valid)[:, P - 1:-1]
    return model_lib.token_stats(model_cfg, params, h, tokens[:, P:], temperature, model_cfg.logits_chunk)


def _apply(tx, state, grads):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}


def skip_if_not_finite(state, new_state, metrics):
    """Keeps `state`'s parameters and optimizer state when the step's loss or gradient norm is not finite.

    Decided inside the jitted step (a select on a traced flag, no host round-trip). The step counter
    advances either way, so the data order, sampling keys and schedule of the following steps stay those
    of a run without the bad step. `metrics['skipped']` is 1.0 for a skipped step, else 0.0.
    """
    ok = jnp.isfinite(metrics["loss"] if "loss" in metrics else metrics["sft_loss"]) & jnp.isfinite(
        metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    guarded = {**new_state, "params": keep(new_state["params"], state["params"]),
               "opt_state": keep(new_state["opt_state"], state["opt_state"])}
    return guarded, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}


def make_sft_step(model_cfg, tx, mesh=None, micro_batches: int = 1, length_buckets: int = 1):
    """Teacher-forced next-token loss on the reference solutions (token-mean over target tokens).

    The rows run in `micro_batches` slices (0 = auto, `slices`) of similar target lengths, each at the
    smallest length bucket holding it (`length_groups`, as the RL update groups its rows); their summed
    losses and gradients are divided once by the batch's target-token count: one optimizer step whose loss
    and gradient are those of one pass over the whole padded batch. With `mesh`: explicit shardings (`_jit_step`) of a
    state without a key (`init_state(params, tx)`)."""

    def sft_step(state, prompts, prompt_lens, targets, target_lens):
        (B, P), T = prompts.shape, targets.shape[1]
        M = slices(micro_batches, B, P + T)
        shapes = bucket_shapes(B // M, T, length_buckets, row_buckets=False)
        mask = jnp.arange(T)[None, :] < target_lens[:, None]
        order, bucket = length_groups(jnp.minimum(target_lens, T), M, shapes)

        def nll_sum(shape, params, mb):  # summed negative log-likelihood of a micro-batch's targets, at shape[1]
            L = shape[1]
            tokens, valid, m = join(mb["prompts"], mb["prompt_lens"], mb["targets"][:, :L], mb["target_lens"])
            logp, _ = token_stats(model_cfg, params, tokens, valid, P)
            return -jnp.sum(logp * m)

        run = per_bucket(shapes, lambda s, mb: jax.value_and_grad(functools.partial(nll_sum, s))(state["params"], mb))
        rows = {"prompts": prompts, "prompt_lens": prompt_lens, "targets": targets, "target_lens": target_lens}
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        total, grads = scan_sum(lambda x: run(*x), zeros, (bucket, jax.tree.map(lambda x: grouped(x, order), rows)))
        count = jnp.maximum(jnp.sum(mask), 1)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        metrics = {"sft_loss": loss, "grad_norm": optax.global_norm(grads)}
        return skip_if_not_finite(state, _apply(tx, state, grads), metrics)

    return _jit_step(sft_step, model_cfg, tx, mesh, ("batch",) * 4, with_rng=False)


AUTO_SLICE_TOKENS = 1024


def auto_slices(rows: int, tokens_per_row: int, row_shards: int = 1) -> int:
    """How many micro-batches `micro_batches = 0` (auto) runs `rows` rows of `tokens_per_row` padded tokens
    in: the most equal slices that keep at least AUTO_SLICE_TOKENS tokens each and split evenly over the
    `row_shards` devices the rows are sharded over (1 when none does). Measured on the README's 2-core CPU:
    a slice of that size still fills the matmuls while its activations stay in cache (the default
    experiment's update 1.3 -> 1.0 s in 8 slices, its SFT step 0.53 -> 0.36 s); on an accelerator, set
    the count for memory instead."""
    fits = [d for d in range(1, rows + 1) if rows % d == 0 and rows // d % row_shards == 0
            and rows // d * tokens_per_row >= AUTO_SLICE_TOKENS]
    return max(fits, default=1)


def slices(requested: int, rows: int, tokens_per_row: int) -> int:
    """A `micro_batches` field's count: `requested`, or for 0 `auto_slices` on the mesh being traced."""
    return requested or auto_slices(rows, tokens_per_row, sharding.row_shards())


def rl_slices(rl, rows: int, tokens_per_row: int) -> int:
    """The RL update's micro-batches over `rows` rows: `slices(rl.micro_batches)`, but with 0 (auto) one
    slice for criteria and losses with batch statistics (`objective.uses_batch_statistics`), whose result
    the slicing would change: auto only ever picks a count that computes the same update."""
    auto_whole = not rl.micro_batches and objective.uses_batch_statistics(rl)
    return 1 if auto_whole else slices(rl.micro_batches, rows, tokens_per_row)


def scan_sum(f, init, xs):
    """The sum of `init` and f(x) over the leading axis of `xs` (pytrees), one `lax.scan`: gradient
    accumulation over micro-batches."""
    return jax.lax.scan(lambda carry, x: (jax.tree.map(jnp.add, carry, f(x)), None), init, xs)[0]


def micro_split(x, M: int):
    """[N, ...] -> [M, N / M, ...]: the slices `lax.scan` / `lax.map` walk over. Strided (slice m holds
    rows m, m + M, ...): with rows sharded over devices, every slice then spans all devices; contiguous
    slices put the sharding on the slice axis, and each device computed a whole slice in turn."""
    return x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)


def bucket_lengths(T: int, n: int) -> tuple[int, ...]:
    """The padded response lengths micro-batches run at (`rl.length_buckets` = n): T, T/2, ..., T/2^(n-1)
    (rounded up, ascending). n = 1 is the padded computation: every micro-batch at the full T."""
    return tuple(sorted({-(-T // 2 ** k) for k in range(n)}))


def bucket_shapes(R: int, T: int, n: int, row_buckets: bool = True) -> tuple[tuple[int, int], ...]:
    """The (rows, length) shapes micro-batches of R rows run at, cheapest first: lengths T / 2^j
    (`bucket_lengths`) and, with row_buckets, rows R / 2^i for i + j < n (rounded up): a micro-batch
    with fewer used rows (the packed update's last one) runs fewer. The shapes then cost at least
    R T / 2^(n-1) tokens, and n (n + 1) / 2 of them compile, against n without row_buckets."""
    shapes = {(-(-R // 2 ** i), L) for i in range(n if row_buckets else 1) for L in bucket_lengths(T, n - i)}
    return tuple(sorted(shapes, key=lambda s: (s[0] * s[1], s)))


def length_groups(lengths, M: int, shapes: tuple[tuple[int, int], ...]):
    """lengths [N] -> (order [M, N / M] row indices of each micro-batch, shape [M] index into `shapes`).

    The rows sorted by length (stable: equal lengths keep their row order, so the grouping is a function
    of the batch alone and a resumed run regroups identically) and cut into M micro-batches of
    consecutive lengths; each runs at the cheapest shape (r, L) holding it: r at least its rows with a
    token (the last ones of the micro-batch, by the ascending sort), L at least its longest, or, without
    a token, not at all (index len(shapes), `per_bucket`'s empty branch). Sorting is what makes
    bucketing pay: a micro-batch of short rows would otherwise be held at full length by one long row.
    """
    order = jnp.argsort(lengths, stable=True).reshape(M, -1)
    used, longest = jnp.sum(lengths[order] > 0, -1), lengths[order[:, -1]]
    rows, cols = (jnp.asarray([s[k] for s in shapes]) for k in (0, 1))
    fits = (rows[None] >= used[:, None]) & (cols[None] >= longest[:, None])
    return order, jnp.where(used > 0, jnp.argmax(fits, -1), len(shapes))


def last_rows(mb: dict, r: int) -> dict:
    """The last r rows of a micro-batch's arrays (those of its rows with tokens, `length_groups`)."""
    return {k: v[v.shape[0] - r:] if jnp.ndim(v) else v for k, v in mb.items()}


def grouped(x, order):
    """[N, ...] -> [M, N / M, ...] with slice m = x[order[m]], laid out as `micro_split` lays out its slices."""
    return micro_split(x[order.T.reshape(-1)], order.shape[0])


def per_bucket(shapes: tuple, f):
    """f(shape, *args) for the bucket shapes as one function of (bucket index, *args): `lax.switch` over one
    branch per shape, each traced and compiled once into the calling step, and for index len(shapes) (a
    micro-batch without tokens) zeros of f's output."""
    branches = [functools.partial(f, shape) for shape in shapes]
    empty = lambda *args: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(branches[0], *args))
    return lambda i, *args: jax.lax.switch(i, branches + [empty], *args)


def split_batch(prompts, prompt_lens, completions, lengths) -> tuple[dict, dict]:
    """The update's view of a rollout batch: each prompt once, and the rows that continue it.

    prompts [B, P] left-padded, prompt_lens [B], completions [N, T] right-padded, lengths [N], N = B * G ->
    (prompt {'tokens', 'valid' [B, P]}, rows {'completions' [N, T], 'mask' [N, T] the response tokens,
    'group' [N] the prompt of each row}). Further per-row arrays ('adv', ...) go into `rows`; mini-batches
    and micro-batches index rows, never the prompts.
    """
    B, P = prompts.shape
    N, T = completions.shape
    prompt = {"tokens": prompts, "valid": jnp.arange(P)[None, :] >= (P - prompt_lens)[:, None]}
    rows = {"completions": completions, "mask": jnp.arange(T)[None, :] < lengths[:, None],
            "group": jnp.arange(N, dtype=jnp.int32) // (N // B)}
    return prompt, rows


def pack(mask, group) -> dict:
    """Where each response runs in the update: packed, first-fit decreasing, into rows of width T that
    hold responses to one prompt only (they then share its keys and values, `micro_stats`).

    mask [N, T] the response tokens, group [N] each row's prompt (rows in any order: a mini-batch is a
    random subset) -> {'slot' [N] the packed row of each response, 'start' [N] its first column,
    'fill' [N] tokens per packed row (0 for the unused ones), 'group' [N] the prompt of each packed
    row}. Responses at the full length T stay one per row; a long-tailed batch packs into about
    sum(lengths) / T rows. One `lax.scan` over the N responses, each step O(N): a few ms at N = 512.
    """
    N, T = mask.shape
    lengths = jnp.sum(mask, -1, dtype=jnp.int32)
    order = jnp.lexsort((-lengths, group))  # by prompt, longest first

    def place(carry, n):
        fill, owner, opened = carry
        fits = (owner == group[n]) & (fill + lengths[n] <= T)
        slot = jnp.where(jnp.any(fits), jnp.argmax(fits), opened)
        start = fill[slot]
        carry = (fill.at[slot].add(lengths[n]), owner.at[slot].set(group[n]), opened + (slot == opened))
        return carry, (slot, start)

    init = (jnp.zeros(N, jnp.int32), jnp.full(N, -1, jnp.int32), jnp.int32(0))
    (fill, owner, _), (slot, start) = jax.lax.scan(place, init, order)
    back = lambda x: jnp.zeros(N, jnp.int32).at[order].set(x)  # sorted order -> row order
    return {"slot": back(slot), "start": back(start), "fill": fill, "group": jnp.maximum(owner, 0)}


def packed_inputs(prompt: dict, rows: dict, layout: dict) -> dict:
    """The packed rows' model inputs [N, T] (`pack`): 'tokens' (each response's last prompt token, then
    its tokens but the last), 'targets' (its tokens, the ones the inputs predict), 'segment' (the
    response's row + 1 on its columns, 0 on unused ones)."""
    completions, mask = rows["completions"], rows["mask"]
    N, T = mask.shape
    inputs = jnp.concatenate([prompt["tokens"][rows["group"], -1:], completions[:, :-1]], axis=1)
    cols = jnp.where(mask, layout["start"][:, None] + jnp.arange(T), T)  # past the response: dropped
    place = lambda x: jnp.zeros((N, T), x.dtype).at[layout["slot"][:, None], cols].set(x, mode="drop")
    return {"tokens": place(inputs), "targets": place(completions),
            "segment": place(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.int32)[:, None], (N, T)))}


def unpack(stats, layout: dict, idx, mask):
    """Per-token results of packed rows back to their responses: stats, tuple of [R, L] arrays for the
    packed rows idx [R] -> ([N, T] arrays, zero outside the responses packed there; mask [N, T] of their
    tokens). The loss then sees the arrays of the padded computation."""
    R, L = stats[0].shape
    N, T = mask.shape
    local = jnp.full(N, R, jnp.int32).at[idx].set(jnp.arange(R, dtype=jnp.int32))[layout["slot"]]
    mask = mask & (local < R)[:, None]
    cols = jnp.minimum(layout["start"][:, None] + jnp.arange(T), L)
    at = lambda x: jnp.where(mask, jnp.pad(x, ((0, 1), (0, 1)))[local[:, None], cols], 0)
    return tuple(map(at, stats)), mask


PROMPT_PASSES = ("once", "per_row")  # `rl.prompt_pass`, see `micro_stats`


def row_prefix(rl, prompt: dict) -> int:
    """Prompt tokens at the front of each packed row (`micro_stats`): with `per_row` the prompt's first
    P - 1 (its last runs with each response), with `once` none (they come from `prefix_kv`)."""
    return prompt["tokens"].shape[1] - 1 if rl.prompt_pass == "per_row" else 0


def prefix_kv(model_cfg, params, prompt: dict) -> dict:
    """Keys and values of every prompt's first P - 1 tokens (`tsched.model.prompt_kv`), computed once per
    prompt for all its rows; the last prompt token runs with each response (`packed_inputs`), because its
    hidden state predicts the response's first token. None for one-token prompts (nothing precedes it)."""
    if prompt["tokens"].shape[1] == 1:
        return None
    return model_lib.prompt_kv(model_cfg, params, prompt["tokens"][:, :-1], prompt["valid"][:, :-1])


def micro_stats(rl, model_cfg, params, kv, prompt: dict, mb: dict, L: int):
    """Log-probs and entropies [R, L] under `params` of the targets of packed rows mb ({'tokens',
    'targets', 'segment' [R, T], 'group' [R]}, `packed_inputs` and `pack`), run at length bucket L. Each
    response attends over its prompt's first P - 1 tokens and causally over itself (`hidden_states`'
    segments): on its tokens this is one pass over the prompt and the response joined. The prompt part,
    by `rl.prompt_pass`:

        once     kv, the prompts' keys and values computed once per update for all B prompts
                 (`prefix_kv`): the least compute, but they and their cotangents, [L, B, K, Dh, P - 1]
                 each, are live through the whole micro-batch loop.
        per_row  kv None: the prompt's tokens run at the front of each packed row (G times the prompt
                 compute for unpacked rows), so the memory is bounded by the micro-batch (a 4B model with
                 512-token prompts and one sequence per micro-batch does not fit a v5e chip otherwise;
                 see tsched.plan).
    """
    tokens, segment, group = mb["tokens"][:, :L], mb["segment"][:, :L], mb["group"]
    prefix = row_prefix(rl, prompt)
    tokens = jnp.concatenate([prompt["tokens"][group, :prefix], tokens], axis=1)
    valid = jnp.concatenate([prompt["valid"][group, :prefix], segment > 0], axis=1)
    segment = jnp.pad(segment, ((0, 0), (prefix, 0)))
    shared = None if kv is None else (kv, prompt["valid"][:, :-1], group)
    h = model_lib.hidden_states(model_cfg, params, tokens, valid, shared, segment)[:, prefix:]
    return model_lib.token_stats(model_cfg, params, h, mb["targets"][:, :L], rl.temperature, model_cfg.logits_chunk)


def micro_batches(rl, prompt: dict, rows: dict):
    """The update's micro-batches (`rl_slices` of them) of packed rows: (layout, the scan's inputs {packed
    inputs [M, N / M, T] and 'group', 'idx' [M, N / M] their packed rows, 'bucket' [M], 'index' [M]},
    bucket shapes)."""
    N, T = rows["mask"].shape
    M = rl_slices(rl, N, row_prefix(rl, prompt) + T)
    shapes = bucket_shapes(N // M, T, rl.length_buckets)
    layout = pack(rows["mask"], rows["group"])
    order, bucket = length_groups(layout["fill"], M, shapes)
    inputs = {**packed_inputs(prompt, rows, layout), "group": layout["group"]}
    mbs = {**jax.tree.map(lambda x: grouped(x, order), inputs), "idx": order, "bucket": bucket, "index": jnp.arange(M)}
    return layout, mbs, shapes


def score(rl, model_cfg, params, rows: dict, prompt: dict):
    """Log-probs and entropies [N, T] of the completion tokens under `params` (the policy that sampled
    them), packed and in micro-batches as the update runs them (zero past each response): the old policy
    of several updates per rollout."""
    layout, mbs, shapes = micro_batches(rl, prompt, rows)
    kv = prefix_kv(model_cfg, params, prompt) if rl.prompt_pass == "once" else None

    def micro(shape, mb):
        mb = last_rows(mb, shape[0])
        return unpack(micro_stats(rl, model_cfg, params, kv, prompt, mb, shape[1]), layout, mb["idx"], rows["mask"])[0]

    run = per_bucket(shapes, micro)
    zeros = jnp.zeros(rows["mask"].shape, jnp.float32)
    return scan_sum(lambda mb: run(mb["bucket"], mb), (zeros, zeros), mbs)


def policy_gradient(rl, model_cfg, params, ref_params, r, rows: dict, prompt: dict, key=None):
    """Loss, gradient and metric sums of the scheduled objective, accumulated over micro-batches (`rl_slices`).

    prompt, rows: as `split_batch` gives them, rows with 'adv' [N] and optionally 'sample_logp' (the
    sampler's log-probs, for the mismatch metric), 'old_logp' and 'old_entropy' [N, T] (the sampling
    policy's, when it is not the current one); r the schedule magnitude; key a PRNG key for losses that
    draw at random (folded with the micro-batch index). Returns (loss, grads, sums) with loss and grads
    normalised by the denominator summed over all micro-batches, so the result equals one pass over the
    whole batch for every aggregation mode.

    Cost follows the real tokens. Each prompt runs once (`prefix_kv`; `rl.prompt_pass=once`), not once per
    sampled row: the micro-batches take gradients with respect to the parameters and the prompts' keys
    and values, and the summed key/value cotangents go back through the one prompt pass at the end (its
    `jax.vjp`); `per_row` trades that for memory (`micro_stats`). Each prompt's responses are packed
    into shared rows (`pack`), the packed rows sorted by fill into micro-batches, each run at its bucket
    shape (`bucket_shapes`, `rl.length_buckets`) under `lax.switch`, one branch per shape, so every shape
    is compiled once into the one step (micro-batches of unused rows do not run). Only the model runs
    packed: the loss sees each micro-batch's responses as [N, T] arrays of the padded computation
    (`unpack`, zero outside the micro-batch), so its value and gradient equal one pass over the joined
    rows at full length (tested). Criteria with micro-batch statistics (forking_batch, empg, d3s batch
    scope, clip_cov, kl_cov) take them over these micro-batches (auto keeps them in one).
    """
    once = rl.prompt_pass == "once"
    layout, mbs, shapes = micro_batches(rl, prompt, rows)
    kv, kv_vjp = jax.vjp(lambda p: prefix_kv(model_cfg, p, prompt), params) if once else (None, None)
    ref_kv = prefix_kv(model_cfg, ref_params, prompt) if once and ref_params is not None else None

    def micro(shape, params, kv, mb):
        mb = last_rows(mb, shape[0])
        stats = micro_stats(rl, model_cfg, params, kv, prompt, mb, shape[1])
        if ref_params is not None:
            stats = (*stats, micro_stats(rl, model_cfg, ref_params, ref_kv, prompt, mb, shape[1])[0])
        (logp, entropy, *ref_logp), mask = unpack(stats, layout, mb["idx"], rows["mask"])
        mb_key = None if key is None else jax.random.fold_in(key, mb["index"])
        num, den, sums = objective.policy_loss(rl, r, logp, entropy, rows["adv"], mask, *ref_logp,
                                               old_logp=rows.get("old_logp"), key=mb_key,
                                               sample_logp=rows.get("sample_logp"), old_entropy=rows.get("old_entropy"))
        return num, (den, sums)

    grad = lambda L, mb: jax.value_and_grad(functools.partial(micro, L), (0, 1), has_aux=True)(params, kv, mb)
    run = per_bucket(shapes, grad)

    def step(mb):
        (n, (d, s)), g = run(mb["bucket"], mb)
        return g, n, d, s

    zeros = jax.tree.map(jnp.zeros_like, (params, kv))
    first = jax.tree.map(lambda x: x[0], mbs)
    sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: micro(shapes[-1], params, kv, first)[1][1]))
    (g_params, g_kv), num, den, sums = scan_sum(step, (zeros, 0.0, 0.0, sums0), mbs)
    grads = jax.tree.map(jnp.add, g_params, kv_vjp(g_kv)[0]) if once else g_params
    den = jnp.maximum(den, 1e-8)
    return num / den, jax.tree.map(lambda g: g / den, grads), sums


def make_rl_step(cfg, model_cfg, tx, mesh=None):
    """The jitted RL update `(state, ref_params, batch) -> (new state, metrics)`.

    batch: {'prompts' [B, P], 'prompt_lens' [B], 'completions' [N, T], 'lengths' [N], 'rewards' [N]}
    and optionally 'sample_logp' [N, T] (the sampler's log-probs, for the `logp_mismatch` metric), as
    `tsched.rollout.Rollout.learner_batch()` gives it. `ref_params` (the initial policy) is used for the
    KL penalty and the KL-by-percentile metric; pass None to skip that extra forward pass. Metrics are
    float32 scalars.

    Updates per rollout: `rl.epochs` passes over the batch in `rl.mini_batches` mini-batches, one
    optimizer step each. With 1 and 1 the sampling policy is the current one (ratio 1, no scoring
    pass). Otherwise a scoring pass first computes the sampling policy's log-probs and entropies (the
    old policy of every later update: ratios, clipping and entropy criteria read them), and each epoch
    visits the rows in a fresh order drawn from the step's loss key. The schedule's step counts rollout
    batches (the paper's training step), not optimizer steps; the metrics average over the updates.

    With `mesh`: explicit in/out shardings (`_jit_step`); `ref_params` must then be given exactly when
    the config uses it (`needs_reference`) and the state must carry a key.
    """
    rl = cfg.rl
    E, MB = rl.epochs, rl.mini_batches

    def rl_step(state, ref_params, batch):
        prompts, lengths, rewards = batch["prompts"], batch["lengths"], batch["rewards"]
        step = state["step"] + 1
        r = schedules.magnitude(step, rl.schedule)
        key = step_keys(state["rng"], step)[1] if "rng" in state else None
        adv, zero_var = adv_lib.compute(rewards, rl.group_size, rl.advantage)
        prompt, rows = split_batch(prompts, batch["prompt_lens"], batch["completions"], lengths)
        rows["adv"] = adv
        extra = {}
        if E * MB == 1:
            if "sample_logp" in batch:
                rows["sample_logp"] = batch["sample_logp"]
            loss, grads, sums = policy_gradient(rl, model_cfg, state["params"], ref_params, r, rows, prompt, key)
            new_state = _apply(tx, state, grads)
            grad_norm = optax.global_norm(grads)
        else:
            rows["old_logp"], rows["old_entropy"] = score(rl, model_cfg, state["params"], rows, prompt)
            new_state, loss, grad_norm, sums = _updates(rl, model_cfg, tx, state, ref_params, r, rows, prompt, key)
            if "sample_logp" in batch:  # sampler vs the learner's scoring pass, before any update
                mask = rows["mask"]
                gap = jnp.abs(rows["old_logp"] - batch["sample_logp"]) * mask
                extra["logp_mismatch"] = jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1)
        metrics = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in sums.items()}
        if "kl_bins" in metrics:
            metrics.update({f"kl_bin{i}": metrics["kl_bins"][i] for i in range(objective.KL_BINS)})
            del metrics["kl_bins"]
        if "ratio_sq_mean" in metrics:
            metrics["ratio_std"] = jnp.sqrt(jnp.maximum(metrics.pop("ratio_sq_mean") - metrics["ratio_mean"] ** 2, 0))
        metrics.update(extra)
        metrics.update({
            "loss": loss, "magnitude": r, "grad_norm": grad_norm,
            "reward": jnp.mean(rewards), "zero_var_groups": zero_var,
            "response_len": jnp.mean(lengths.astype(jnp.float32)),
        })
        return skip_if_not_finite(state, new_state, metrics)

    return _jit_step(rl_step, model_cfg, tx, mesh, ("params" if needs_reference(cfg) else None, "batch"),
                     with_rng=True)


def needs_reference(cfg) -> bool:
    """Whether the RL update reads the initial policy (KL penalty or the KL-by-percentile metric)."""
    return cfg.rl.kl_coef > 0 or cfg.train.kl_metrics


def _updates(rl, model_cfg, tx, state, ref_params, r, rows, prompt, key):
    """`rl.epochs` x `rl.mini_batches` optimizer steps over `rows` (with 'old_logp' / 'old_entropy'), one
    `lax.scan`. -> (state, mean loss, mean grad norm, summed metric sums). The state's step advances once."""
    E, MB = rl.epochs, rl.mini_batches
    N = rows["adv"].shape[0]
    order_key, key = jax.random.split(key if key is not None else jax.random.key(0))
    order = jnp.stack([jax.random.permutation(jax.random.fold_in(order_key, e), N) for e in range(E)])
    order = order.reshape(E * MB, N // MB)  # row indices of each update's mini-batch

    def update(carry, x):
        params, opt_state = carry
        idx, i = x
        mb = jax.tree.map(lambda a: a[idx], rows)
        loss, grads, sums = policy_gradient(rl, model_cfg, params, ref_params, r, mb, prompt, jax.random.fold_in(key, i))
        upd, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, upd), opt_state), (loss, optax.global_norm(grads), sums)

    (params, opt_state), (loss, grad_norm, sums) = jax.lax.scan(
        update, (state["params"], state["opt_state"]), (order, jnp.arange(E * MB)))
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, jnp.mean(loss), jnp.mean(grad_norm), jax.tree.map(lambda s: jnp.sum(s, 0), sums)
