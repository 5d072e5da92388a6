"""Cost of the scheduled loss, per credit strategy, relative to the plain GRPO loss.

    python -m tsched.bench.loss [--seqs 64 --tokens 1024 --vocab 32000 --micro 8 --repeats 5]

Times one jitted value-and-gradient of the RL objective with respect to the logits (log-softmax,
entropy, credit allocation, PPO-clip, aggregation, and the metric sums the learner always reports,
entropy by stage among them) at a realistic shape, processed in `--micro`
micro-batches with `lax.scan` as the learner does (64 x 1024 x 32k float32 logits are 8 GiB at once).
The model forward and backward are the same for every strategy and are left out, so the ratios are an
upper bound on the overhead of scheduling inside a full train step. Prints a table (median seconds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsched.config import base_config
from tsched.model import logits as logits_lib
from tsched.rl import credit, objective, schedules

STRATEGIES = list(credit.CRITERIA)  # every registered criterion; uniform (GRPO) first


def make_loss(strategy: str, micro: int):
    cfg = base_config()
    cfg.rl.credit.strategy = strategy
    rl = cfg.rl

    @jax.jit
    def value_and_grad(logits, targets, mask, adv, step):
        r = schedules.magnitude(step, rl.schedule)

        def one(carry, mb):
            lg, tg, m, a = mb
            def f(lg):
                logp, ent = logits_lib.stats_from_logits(lg, tg, rl.temperature)
                num, den, sums = objective.policy_loss(rl, r, logp, ent, a, m)
                return num, (den, sums)
            (num, (den, sums)), g = jax.value_and_grad(f, has_aux=True)(lg)
            return (carry[0] + num, carry[1] + den), (g, sums)

        split = lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:])
        (num, den), (grads, sums) = jax.lax.scan(one, (0.0, 0.0), tuple(map(split, (logits, targets, mask, adv))))
        return num / den, grads, sums

    return value_and_grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    N, T, V = args.seqs, args.tokens, args.vocab
    k = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(k[0], (N, T, V), jnp.float32)
    targets = jax.random.randint(k[1], (N, T), 0, V)
    lengths = jax.random.randint(k[2], (N,), T // 4, T + 1)
    mask = jnp.arange(T)[None] < lengths[:, None]
    adv = jnp.linspace(-1.0, 1.0, N)
    fns = {s: make_loss(s, args.micro) for s in STRATEGIES}
    for fn in fns.values():
        jax.block_until_ready(fn(logits, targets, mask, adv, jnp.int32(1)))
    times = {s: [] for s in STRATEGIES}
    for i in range(args.repeats):  # round-robin, so machine noise and allocator warm-up hit all alike
        for s, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(logits, targets, mask, adv, jnp.int32(2 + i)))
            times[s].append(time.perf_counter() - t0)
    rows = [(s, float(np.median(t))) for s, t in times.items()]
    base = rows[0][1]
    print(f"scheduled loss cost, {N} seqs x {T} tokens x vocab {V}, {args.micro} micro-batches, "
          f"{jax.devices()[0].platform} x {jax.device_count()}")
    print(f"{'strategy':<12} {'median s':>9} {'vs uniform':>11}")
    for name, t in rows:
        print(f"{name:<12} {t:>9.3f} {t / base - 1:>+10.1%}")


if __name__ == "__main__":
    main()
