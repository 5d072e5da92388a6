"""Will it fit? Compile the RL update and the sampler ahead of time and print their memory per chip.

    python -m tsched.plan --config=configs/qwen3_4b_tpu.py --topology=v5e:2x4 [--json plan.json]
    python -m tsched.plan --config=configs/default.py --simulate_devices=8 [--config.<field>=...]

No weights are created: parameters, optimizer state, batches and sampler state are `ShapeDtypeStruct`s
carrying the shardings of the configured mesh, and XLA compiles the very functions the trainer runs
(`tsched.train.learner.make_rl_step`; the sampler's prefill, decode loop and cache resize).

`--topology=NAME` (e.g. v5e:2x4, v5p:2x2x1, v6e:2x4) compiles for that TPU slice through libtpu's
ahead-of-time path (`requirements-tpu.txt`; no TPU needed), so buffer assignment, fusion and
rematerialisation are the TPU compiler's. Without libtpu the plan says so and falls back to as many
simulated CPU devices as the name has chips, whose buffer sizes track the TPU's closely for parameters,
optimizer state and caches and roughly for activations. `--simulate_devices=N` asks for that directly.

Update columns, per device: parameters and optimizer state (sharded shapes of the inputs), reference
policy (when the config reads it), batch, activations and workspace (XLA temp buffers: the live
intermediates of forward and backward), and the total the executable needs at once (arguments +
outputs not aliased to donated inputs + temps).
Sampler columns: the train state stays in memory while sampling (parameters, optimizer state, reference),
plus the per-layer weights the sampler reads, the KV caches of one pass (`rl.prompts_per_pass` prompts x
`rl.group_size` samples at the full response budget: the prompts' caches and the samples' own), the
decode state (tokens, log-probs, next-token logits), workspace, and the total: the largest of prefill,
a decode chunk in the last window, and the resize into that window (old and new caches live at once).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.", lock_config=True)
_SIMULATE = flags.DEFINE_integer("simulate_devices", 0, "Fake this many CPU devices (0: use the real devices).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "Plan for this TPU slice through libtpu, e.g. v5e:2x4, v5p:2x2x1, "
                                                "v6e:2x4 (falls back to simulated CPU devices without libtpu).")
_JSON = flags.DEFINE_string("json", "", "Also write the plan (bytes per device) to this JSON file.")

GiB = 2.0 ** 30
# HBM per device (one per chip on these generations) by `device_kind`, from the public TPU specs.
HBM_GIB = {"TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}


def _bytes_per_device(tree) -> float:
    import jax
    import numpy as np

    return float(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class DoesNotFit(Exception):
    """The TPU compiler refused a program: its temporaries alone exceed the device's HBM."""


def _compile(lowered):
    import jax

    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(str(e).split("RESOURCE_EXHAUSTED:")[-1].strip()) from None


def _footprint(compiled, resident_args: float = 0.0) -> dict:
    """An executable's bytes per device: what it needs at once besides `resident_args` (arguments that are
    counted elsewhere, e.g. the parameters a prefill reads)."""
    m = compiled.memory_analysis()
    return {"temp": float(m.temp_size_in_bytes),
            "total": float(m.argument_size_in_bytes - resident_args + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes)}


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def tpu_devices(topology: str):
    """The devices of a TPU slice compiled for through libtpu (which must be installed)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def chips(topology: str) -> int:
    """The chip count a TPU topology name spells (v5e:2x4 -> 8)."""
    try:
        return math.prod(int(d) for d in topology.split(":")[1].split("x"))
    except (IndexError, ValueError):
        raise app.UsageError(f"--topology={topology!r}: expected GENERATION:AxB[xC], e.g. v5e:2x4") from None


def plan(cfg, devices=None) -> dict:
    """Compiles the RL update and the sampler for the configured mesh over `devices` (default: JAX's).
    -> {'update': {...}, 'sampler': {...}} in bytes per device, plus the model, mesh and platform."""
    import jax
    import jax.numpy as jnp

    from tsched import model as model_lib
    from tsched import sharding
    from tsched.sampling import sampler
    from tsched.train import learner

    mesh = sharding.make_mesh(cfg.mesh, devices)

    def compile_(fn, *args):
        with jax.set_mesh(mesh):  # traced as the trainer traces it (the model pins its rows to the mesh)
            return _compile(fn.lower(*args))

    model_cfg = model_lib.config_from(cfg.model, cfg.tokenizer.vocab_size)
    tx = learner.make_optimizer(cfg.rl.lr, cfg.rl.max_grad_norm, cfg.rl.warmup_steps)
    st_sh = learner.state_shardings(model_cfg, tx, mesh)
    state = _abstract(jax.eval_shape(lambda: learner.init_state(model_lib.init_params(model_cfg, jax.random.key(0)),
                                                                tx, jax.random.key(0))), st_sh)
    params = state["params"]
    ref = params if learner.needs_reference(cfg) else None

    B, G = cfg.rl.prompts_per_step, cfg.rl.group_size
    Pl, T = cfg.data.prompt_len, cfg.rl.max_new_tokens
    rows = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
    batch = {"prompts": rows(B, Pl), "prompt_lens": rows(B), "completions": rows(B * G, T), "lengths": rows(B * G),
             "rewards": rows(B * G, dtype=jnp.float32)}
    update = _footprint(compile_(learner.make_rl_step(cfg, model_cfg, tx, mesh), state, ref, batch))
    resident = {"parameters": _bytes_per_device(params), "optimizer state": _bytes_per_device(state["opt_state"]),
                "reference policy": _bytes_per_device(ref) if ref is not None else 0.0}
    out_update = {**resident, "batch": _bytes_per_device(batch), "activations + workspace": update["temp"],
                  "total": update["total"]}

    # The sampler: one pass of prompts_per_pass prompts, planned at the first and the last cache window.
    b = cfg.rl.prompts_per_pass or B
    scfg = sampler.SamplingConfig(max_new_tokens=T, eos_id=0, pad_id=0, temperature=cfg.rl.temperature,
                                  top_p=cfg.rl.top_p, top_k=cfg.rl.top_k, num_samples=G,
                                  cache_dtype=cfg.rl.cache_dtype, prompts_per_pass=cfg.rl.prompts_per_pass)
    windows = sampler._windows(T)
    args = (params, rows(b, Pl), rows(b), rows(b * G))
    prefill = compile_(sampler._prefill, model_cfg, scfg, windows[0], mesh, *args)
    layers_sh, prompt_sh, state_sh = prefill.output_shardings  # the same specs at every window width
    at = lambda width: _abstract(jax.eval_shape(lambda *a: sampler._prefill(model_cfg, scfg, width, mesh, *a), *args),
                                 (layers_sh, prompt_sh, state_sh))
    layers, prompt, last = at(windows[-1])
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=sharding.replicated(mesh))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))
    decode = compile_(sampler._decode, model_cfg, scfg, mesh, layers, prompt, last, args[3], key,
                      scalar(jnp.int32), scalar(jnp.int32))
    res = sum(resident.values())
    weights, prompt_b = _bytes_per_device(layers), _bytes_per_device(prompt)
    peaks = {"prefill": _footprint(prefill, resident_args=resident["parameters"]), "decode": _footprint(decode)}
    if len(windows) > 1:
        before = at(windows[-2])[2]
        resize = compile_(sampler._resize, b * G, windows[-1], mesh, before)
        peaks["resize"] = {k: v + (weights + prompt_b if k == "total" else 0.0) for k, v in _footprint(resize).items()}
    caches = _bytes_per_device(last["cache"]) + _bytes_per_device(prompt["cache"])
    out_sampler = {**resident, "sampling weights": weights, "KV cache": caches,
                   "decode state": _bytes_per_device(last) + prompt_b - caches,
                   "activations + workspace": max(p["temp"] for p in peaks.values()),
                   "total": res + max(p["total"] for p in peaks.values())}
    return {"model": model_cfg, "mesh": dict(mesh.shape), "devices": mesh.devices.size,
            "platform": mesh.devices.flat[0].platform, "device_kind": mesh.devices.flat[0].device_kind,
            "update": out_update, "sampler": out_sampler,
            "sampler_peak": max(peaks, key=lambda k: peaks[k]["total"]), "sampler_prompts_per_pass": b}


def _table(name: str, memory: dict, hbm_gib: float | None) -> None:
    print(f"{name:<26} {'MiB':>10} {'GiB':>8}")
    for k, v in memory.items():
        print(f"{k:<26} {v / 2**20:>10.1f} {v / GiB:>8.2f}")
    if hbm_gib:
        print(f"{'headroom':<26} {'':>10} {hbm_gib - memory['total'] / GiB:>8.2f}  "
              f"({100 * (1 - memory['total'] / GiB / hbm_gib):.0f}% of {hbm_gib:g} GiB HBM)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    topology, simulate = _TOPOLOGY.value, _SIMULATE.value
    if topology and simulate:
        raise app.UsageError("give --topology or --simulate_devices, not both")
    devices_from_tpu = bool(topology) and importlib.util.find_spec("libtpu") is not None
    if topology and not devices_from_tpu:
        simulate = chips(topology)
        print(f"plan: libtpu is not installed (pip install -r requirements-tpu.txt): planning {topology} on "
              f"{simulate} simulated CPU devices, whose buffer sizes only approximate the TPU compiler's")
    if simulate:
        if "jax" in sys.modules:
            raise RuntimeError("--simulate_devices must take effect before JAX starts")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={simulate}")
    if simulate or devices_from_tpu:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU slice is compiled for, never run on
    if devices_from_tpu:  # compiling opens no TPU: plan beside a run (or another plan) that holds libtpu's lock
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from tsched.config import validate

    cfg = _CONFIG.value
    devices = tpu_devices(topology) if devices_from_tpu else None
    validate(cfg, num_devices=len(devices) if devices is not None else None)
    try:
        r = plan(cfg, devices)
    except DoesNotFit as e:
        print(f"plan: does not fit on {topology or 'these devices'}: {e}")
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump({"topology": topology or None, "fits": False, "error": str(e)}, f, indent=2)
        sys.exit(1)
    m, hbm = r["model"], HBM_GIB.get(r["device_kind"]) if devices_from_tpu else None
    where = f"{topology} ({r['device_kind']}, compiled by libtpu)" if devices_from_tpu else f"{r['platform']}"
    print(f"plan: {m.num_params() / 1e9:.2f}B parameters ({m.n_layers} layers, d {m.d_model}), compute {m.dtype}, "
          f"remat {m.remat}, logits_chunk {m.logits_chunk}, attn_block {m.attn_block}; mesh {r['mesh']} over "
          f"{r['devices']} {where} devices")
    print(f"RL update: {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size} samples, prompt {cfg.data.prompt_len} "
          f"+ {cfg.rl.max_new_tokens} new tokens, {cfg.rl.micro_batches} micro-batches")
    _table("update, per device", r["update"], hbm)
    print(f"sampler: {r['sampler_prompts_per_pass']} prompts x {cfg.rl.group_size} samples per pass, cache "
          f"{cfg.rl.cache_dtype}; peak in the {r['sampler_peak']}")
    _table("sampler, per device", r["sampler"], hbm)
    if _JSON.value:
        out = {"config": cfg.to_dict(), "topology": topology or None, "compiled_for": where, "devices": r["devices"],
               "mesh": r["mesh"], "params": m.num_params(), "hbm_per_device_gib": hbm,
               "update_bytes_per_device": r["update"], "sampler_bytes_per_device": r["sampler"],
               "sampler_peak": r["sampler_peak"]}
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
