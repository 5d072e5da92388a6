"""The update steps, each one pure jitted function of (state, batch): SFT and the scheduled RL update.

The RL update is where the paper's idea lives: `r = schedule(step)` is computed from the traced step
counter, the credit criterion turns it into a token mask / token advantages, and PPO-clip or GSPO with
the configured aggregation gives the loss, all inside one `jax.jit` that compiles once for every step.

State (everything a resume needs besides the data iterator): {'params', 'opt_state', 'step', 'rng'}.
Layout of a batch: prompts [B, P] left-padded, completions [N, T] right-padded, N = B * G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from tsched import model as model_lib
from tsched.rl import advantages as adv_lib
from tsched.rl import objective, schedules


def make_optimizer(lr: float, max_grad_norm: float, warmup_steps: int = 0, total_steps: int = 0):
    if warmup_steps and total_steps:
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr, b1=0.9, b2=0.99,
                                                                            weight_decay=0.0))


def init_state(params, tx, rng=None) -> dict:
    """rng: a PRNG key; kept as raw key data so the state is a plain array pytree for Orbax."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    if rng is not None:
        state["rng"] = jax.random.key_data(rng)
    return state


def join(prompts, prompt_lens, completions, lengths):
    """-> tokens [N, P+T], valid [N, P+T], response_mask [N, T], with prompts repeated to N rows."""
    G = completions.shape[0] // prompts.shape[0]
    P, T = prompts.shape[1], completions.shape[1]
    prompts, prompt_lens = jnp.repeat(prompts, G, axis=0), jnp.repeat(prompt_lens, G)
    response_mask = jnp.arange(T)[None, :] < lengths[:, None]
    valid = jnp.concatenate([jnp.arange(P)[None, :] >= (P - prompt_lens)[:, None], response_mask], axis=1)
    return jnp.concatenate([prompts, completions], axis=1), valid, response_mask


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


def make_sft_step(model_cfg, tx):
    """Teacher-forced next-token loss on the reference solutions (token-mean over target tokens)."""

    @functools.partial(jax.jit, donate_argnums=0)
    def sft_step(state, prompts, prompt_lens, targets, target_lens):
        tokens, valid, mask = join(prompts, prompt_lens, targets, target_lens)

        def loss_fn(params):
            logp, _ = token_stats(model_cfg, params, tokens, valid, prompts.shape[1])
            return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        return _apply(tx, state, grads), {"sft_loss": loss, "grad_norm": optax.global_norm(grads)}

    return sft_step


def policy_gradient(rl, model_cfg, params, ref_params, r, tokens, valid, mask, adv, P: int):
    """Loss, gradient and metric sums of the scheduled objective, accumulated over `rl.micro_batches`.

    tokens, valid [N, P+T], mask [N, T], adv [N]; r the schedule magnitude. Returns (loss, grads,
    sums) with loss and grads normalised by the denominator summed over all micro-batches, so the
    result equals one pass over the whole batch for every aggregation mode.
    """
    M = rl.micro_batches

    def micro(params, mb):
        logp, entropy = token_stats(model_cfg, params, mb["tokens"], mb["valid"], P, rl.temperature)
        ref_logp = None if ref_params is None else token_stats(model_cfg, ref_params, mb["tokens"], mb["valid"], P,
                                                               rl.temperature)[0]
        num, den, sums = objective.policy_loss(rl, r, logp, entropy, mb["adv"], mb["mask"], ref_logp)
        return num, (den, sums)

    split = lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:])
    mbs = {"tokens": split(tokens), "valid": split(valid), "mask": split(mask), "adv": split(adv)}

    def body(carry, mb):
        (n, (d, s)), g = jax.value_and_grad(micro, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, carry, (g, n, d, s)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: micro(params, jax.tree.map(lambda x: x[0], mbs))[1][1]))
    (grads, num, den, sums), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, sums0), mbs)
    den = jnp.maximum(den, 1e-8)
    return num / den, jax.tree.map(lambda g: g / den, grads), sums


def make_rl_step(cfg, model_cfg, tx):
    """The jitted RL update `(state, ref_params, prompts, prompt_lens, completions, lengths, rewards)`.

    `ref_params` (the initial policy) is used for the KL penalty and the KL-by-percentile metric; pass
    None to skip that extra forward pass. Returns (new state, metrics dict of float32 scalars).
    """
    rl = cfg.rl

    @functools.partial(jax.jit, donate_argnums=0)
    def rl_step(state, ref_params, prompts, prompt_lens, completions, lengths, rewards):
        step = state["step"] + 1  # the schedule's step counter starts at 1
        r = schedules.magnitude(step, rl.schedule)
        adv, zero_var = adv_lib.compute(rewards, rl.group_size, rl.advantage)
        tokens, valid, mask = join(prompts, prompt_lens, completions, lengths)
        loss, grads, sums = policy_gradient(rl, model_cfg, state["params"], ref_params, r, tokens, valid, mask, adv,
                                            prompts.shape[1])
        new_state = _apply(tx, state, grads)
        metrics = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in sums.items()}
        if "kl_bins" in metrics:
            metrics.update({f"kl_bin{i}": metrics["kl_bins"][i] for i in range(objective.KL_BINS)})
            del metrics["kl_bins"]
        metrics.update({
            "loss": loss, "magnitude": r, "grad_norm": optax.global_norm(grads),
            "reward": jnp.mean(rewards), "zero_var_groups": zero_var,
            "response_len": jnp.mean(lengths.astype(jnp.float32)),
        })
        return new_state, metrics

    return rl_step
