"""Two processes with 4 CPU devices each run the jitted SFT and RL steps as one process with 8 devices.

The building blocks of multi-host training: `jax.distributed.initialize`, a mesh over every process's
devices, batches placed from each process's own rows (`sharding.place_batch`) and steps jitted with
explicit shardings. Each process is a subprocess (the device count and the distributed client are fixed
when JAX starts); CPU collectives between them go through gloo.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # three subprocesses that compile

B, G, P, T = 8, 2, 5, 6


def worker(num_processes: int, process_id: int, port: int, out: str) -> None:
    import jax

    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes, process_id, initialization_timeout=120,
                                   heartbeat_timeout_seconds=30)
    import optax
    from jax.experimental import multihost_utils
    from ml_collections import ConfigDict

    from tsched import model, multihost, sharding
    from tsched.config import base_config
    from tsched.train import learner

    assert jax.device_count() == 8 and jax.process_count() == num_processes
    mcfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                             ffn_dim=64, qk_norm=True)
    mesh = sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 4, "tensor": 1}))
    param_sh = sharding.logical_to_sharding(model.logical_axes(mcfg), mesh)
    rng = np.random.default_rng(0)  # the same global batch in every process; each places its own rows
    batch = {"prompts": rng.integers(4, 64, (B, P)).astype(np.int32), "prompt_lens": np.full(B, P, np.int32),
             "completions": rng.integers(4, 64, (B * G, T)).astype(np.int32),
             "lengths": rng.integers(1, T + 1, B * G).astype(np.int32),
             "rewards": rng.integers(0, 2, B * G).astype(np.float32)}
    per = lambda x: x.shape[0] // num_processes
    local = {k: v[process_id * per(v):(process_id + 1) * per(v)] for k, v in batch.items()}
    cfg = base_config()
    cfg.train.kl_metrics = False
    tx = optax.adam(1e-2)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda k: model.init_params(mcfg, k), out_shardings=param_sh)
        placed = sharding.place_batch(local, mesh)
        rl_state = learner.init_state(init(jax.random.key(0)), tx, jax.random.key(1))
        rl_step = learner.make_rl_step(cfg, mcfg, tx, mesh)
        sft_state = learner.init_state(init(jax.random.key(0)), tx)
        sft_step = learner.make_sft_step(mcfg, tx, mesh)
        sft_batch = sharding.place_batch((local["prompts"], local["prompt_lens"], local["completions"][::G],
                                          local["lengths"][::G]), mesh)
        losses = []
        for _ in range(3):
            rl_state, m = rl_step(rl_state, None, placed)
            sft_state, s = sft_step(sft_state, *sft_batch)
            losses.append([float(m["loss"]), float(m["grad_norm"]), float(s["sft_loss"])])
    # Placing each process's rows gives the global batch whether the batch axes span the processes (mesh)
    # or the rows are replicated over them (a tensor-parallel mesh: all-gathered first)
    for m in (mesh, sharding.make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 8}))):
        got = multihost.fetch(sharding.place_batch(local, m))
        assert all(np.array_equal(got[k], batch[k]) for k in batch), dict(m.shape)
    params = multihost_utils.process_allgather({"rl": rl_state["params"], "sft": sft_state["params"]}, tiled=True)
    if process_id == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, losses=np.asarray(losses), **flat)


def _launch(n: int, tmp_path, tag: str):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"{tag}.npz")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
    procs = [subprocess.Popen([sys.executable, "-c", f"import tests.test_multiprocess as t; t.worker({n}, {i}, {port}, "
                               f"{out!r})"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return np.load(out)


def test_two_processes_train_as_one_with_all_devices(tmp_path):
    one, two = _launch(1, tmp_path, "one"), _launch(2, tmp_path, "two")
    assert one.files == two.files and len(one.files) > 3
    # Same programs; only the cross-process all-reduce (gloo) sums in another order: float32 rounding.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert not np.allclose(one["losses"][0], one["losses"][-1])  # the steps moved the parameters
