"""Will it fit? Compile the RL update ahead of time from abstract shapes and print per-device memory.

    python -m tsched.plan --config=configs/qwen3_4b_tpu.py [--simulate_devices=8] [--config.<field>=...]

No weights are created: parameters, optimizer state and the batch are `ShapeDtypeStruct`s carrying the
shardings of the configured mesh, and XLA compiles the same jitted update the trainer runs
(`tsched.train.learner.make_rl_step`). `--simulate_devices=N` fakes N CPU devices, so a TPU mesh can
be planned on a laptop; the compiler's buffer sizes are then the CPU backend's, which tracks the
accelerator's closely for parameters and optimizer state and roughly for activations (fusion and
rematerialisation differ between backends).

Columns, per device: parameters and optimizer state (sharded shapes of the inputs), batch (token ids
and rewards), activations and workspace (XLA temp buffers, the live intermediate values of forward and
backward), and the total the executable needs at once (arguments + outputs not aliased to donated
inputs + temps).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.", lock_config=True)
_SIMULATE = flags.DEFINE_integer("simulate_devices", 0, "Fake this many CPU devices (0: use the real devices).")

GiB = 2.0 ** 30


def _bytes_per_device(tree) -> float:
    import jax
    import numpy as np

    return float(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def plan(cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from tsched import model as model_lib
    from tsched import sharding
    from tsched.train import learner

    model_cfg = model_lib.config_from(cfg.model, cfg.tokenizer.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    param_shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh)
    shapes = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings)

    tx = learner.make_optimizer(cfg.rl.lr, cfg.rl.max_grad_norm, cfg.rl.warmup_steps)
    abstract = jax.eval_shape(lambda p: learner.init_state(p, tx, jax.random.key(0)), params)
    replicated = sharding.replicated(mesh)
    # Optimizer moments are sharded like the parameters they belong to; counters are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, sh: sh, abstract["opt_state"], param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = {**jax.tree.map(lambda _: replicated, abstract), "params": param_shardings, "opt_state": opt_shardings}
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)

    B, G = cfg.rl.prompts_per_step, cfg.rl.group_size
    Pl, T = cfg.data.prompt_len, cfg.rl.max_new_tokens
    rows = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
    batch = {"prompts": rows(B, Pl), "prompt_lens": rows(B), "completions": rows(B * G, T), "lengths": rows(B * G),
             "rewards": rows(B * G, dtype=jnp.float32)}
    ref = params if (cfg.rl.kl_coef > 0 or cfg.train.kl_metrics) else None
    step = learner.make_rl_step(cfg, model_cfg, tx)
    compiled = step.lower(state, ref, batch).compile()
    mem = compiled.memory_analysis()

    out = {
        "parameters": _bytes_per_device(state["params"]),
        "optimizer state": _bytes_per_device(state["opt_state"]),
        "reference policy": _bytes_per_device(ref) if ref is not None else 0.0,
        "batch": _bytes_per_device(batch),
        "activations + workspace": float(mem.temp_size_in_bytes),
        "total": float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                       + mem.temp_size_in_bytes),
    }
    return {"model": model_cfg, "mesh": dict(mesh.shape), "devices": mesh.devices.size, "memory": out,
            "platform": jax.devices()[0].platform}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _SIMULATE.value:
        if "jax" in sys.modules:
            raise RuntimeError("--simulate_devices must take effect before JAX starts")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_SIMULATE.value}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    from tsched.config import validate

    cfg = _CONFIG.value
    validate(cfg)
    r = plan(cfg)
    m = r["model"]
    print(f"plan: {m.num_params() / 1e9:.2f}B parameters ({m.n_layers} layers, d {m.d_model}), compute {m.dtype}, "
          f"remat {m.remat}, logits_chunk {m.logits_chunk}, attn_block {m.attn_block}; mesh {r['mesh']} over "
          f"{r['devices']} {r['platform']} devices")
    print(f"RL update: {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size} samples, prompt {cfg.data.prompt_len} "
          f"+ {cfg.rl.max_new_tokens} new tokens, {cfg.rl.micro_batches} micro-batches")
    print(f"{'per device':<26} {'MiB':>10} {'GiB':>8}")
    for k, v in r["memory"].items():
        print(f"{k:<26} {v / 2**20:>10.1f} {v / GiB:>8.2f}")


if __name__ == "__main__":
    app.run(main)
