"""Sharded over 8 simulated CPU devices, loss, gradients, sampled tokens and the jitted steps (explicit
in/out shardings) equal the single-device ones.

The device count is fixed when JAX starts, so the check runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # subprocesses that compile for several devices


def check(mesh_shape, memory_saving=False):
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from ml_collections import ConfigDict

    from tsched import model, sharding
    from tsched.config import base_config
    from tsched.rl import objective
    from tsched.sampling.sampler import SamplingConfig, sample
    from tsched.train import learner

    import optax

    assert jax.device_count() == 8
    # Heads, KV heads, MLP and vocabulary all divide over a 4-way 'tensor' axis.
    mcfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=4,
                             ffn_dim=64, qk_norm=True)
    if memory_saving:  # chunked log-probs and blockwise attention: scans over sharded rows
        mcfg = dataclasses.replace(mcfg, logits_chunk=4, attn_block=4)
    params = model.init_params(mcfg, jax.random.key(0))
    B, G, P, T = 8, 4, 6, 10  # prompts split over up to 8 devices
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(4, 64, (B, P)), jnp.int32)
    plens = jnp.asarray([6, 3, 5, 1, 2, 6, 4, 6], jnp.int32)
    prompts = jnp.where(jnp.arange(P)[None] >= P - plens[:, None], prompts, 0)
    scfg = SamplingConfig(max_new_tokens=T, eos_id=3, pad_id=0, temperature=1.0, num_samples=G)
    cfg = base_config()
    cfg.rl.credit.strategy = "forking"

    def loss(p, comps, lens, adv):
        tokens, valid, mask = learner.join(prompts, plens, comps, lens)
        logp, ent = learner.token_stats(mcfg, p, tokens, valid, P)
        num, den, _ = objective.policy_loss(cfg.rl, jnp.float32(0.5), logp, ent, adv, mask)
        return num / den

    tx = optax.sgd(0.1)

    def run(p, mesh=None):
        out = sample(mcfg, scfg, p, prompts, plens, jax.random.key(1))
        adv = jnp.linspace(-1, 1, B * G)
        value, grads = jax.jit(jax.value_and_grad(loss))(p, out["tokens"], out["lengths"], adv)
        # The trainer's steps: on a mesh jitted with explicit in/out shardings, the batch placed by rows.
        batch = {"prompts": prompts, "prompt_lens": plens, "completions": out["tokens"], "lengths": out["lengths"],
                 "rewards": np.linspace(0, 1, B * G).astype(np.float32)}
        if mesh is not None:
            batch = sharding.place_batch(jax.device_get(batch), mesh)
        rl_state = learner.init_state(jax.tree.map(jnp.copy, p), tx, jax.random.key(2))
        rl_state, rl_m = learner.make_rl_step(cfg, mcfg, tx, mesh)(rl_state, p, batch)
        sft_batch = jax.device_get((batch["prompts"], batch["prompt_lens"], batch["completions"][::G],
                                    batch["lengths"][::G]))
        if mesh is not None:
            sft_batch = sharding.place_batch(sft_batch, mesh)
        # SFT in 2 slices of 4 rows at 2 length buckets; RL in one (auto at this small batch)
        assert learner.rl_slices(cfg.rl, B * G, T) == 1
        sft_state, sft_m = learner.make_sft_step(mcfg, tx, mesh, 2, 2)(
            learner.init_state(jax.tree.map(jnp.copy, p), tx), *sft_batch)
        if mesh is not None:  # the steps' outputs carry exactly the declared shardings
            want = learner.state_shardings(mcfg, tx, mesh)
            jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                         rl_state, want)
        return jax.device_get((out["tokens"], value, grads, rl_m["loss"], rl_state["params"], sft_m["sft_loss"],
                               sft_state["params"]))

    single = run(jax.device_put(params, jax.devices()[0]))
    mesh = sharding.make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
    shardings = sharding.logical_to_sharding(model.logical_axes(mcfg), mesh)
    sharded_params = jax.device_put(params, shardings)
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(sharded_params))
    with jax.set_mesh(mesh):  # as the trainer runs: the model pins its activations' rows to the mesh
        assert sharding.row_shards() == mesh_shape[0] * mesh_shape[1]
        multi = run(sharded_params, mesh)
    np.testing.assert_array_equal(multi[0], single[0])
    for got, want in zip(multi[1:], single[1:]):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("mesh_shape,memory_saving", [((8, 1, 1), False), ((2, 4, 1), False), ((2, 2, 2), False),
                                                       ((2, 1, 4), False), ((2, 2, 2), True)])
def test_sharded_equals_single_device(mesh_shape, memory_saving):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
    code = f"import tests.test_sharding as t; t.check({mesh_shape!r}, {memory_saving!r}); print('OK')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]


def test_a_state_built_on_the_mesh_compiles_its_step_once(tiny_model_cfg, tiny_params):
    """The step counter, key and optimizer counts are made outside jit; placed beside the parameters, the
    jitted step's second call reuses the first call's executable (otherwise: one extra compile per run)."""
    import jax
    import jax.numpy as jnp
    import optax
    from ml_collections import ConfigDict

    from tsched import model, sharding
    from tsched.train import learner

    mesh = sharding.make_mesh(ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    params = jax.device_put(jax.tree.map(jnp.copy, tiny_params),  # the step donates its state
                            sharding.logical_to_sharding(model.logical_axes(tiny_model_cfg), mesh))
    tx = optax.adam(1e-3)
    state = learner.init_state(params, tx, jax.random.key(0))
    step = learner.make_sft_step(tiny_model_cfg, tx)
    batch = (jnp.ones((4, 3), jnp.int32), jnp.full((4,), 3, jnp.int32), jnp.ones((4, 5), jnp.int32),
             jnp.full((4,), 5, jnp.int32))
    state, _ = step(state, *batch)
    compiles = []
    listener = lambda event, duration_s, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            state, _ = step(state, *batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert int(state["step"]) == 3
    # a pytree off any mesh is left as it is
    assert sharding.colocate({"a": jnp.zeros(2)}, {"b": jnp.zeros(2)})["a"].sharding == jnp.zeros(2).sharding
