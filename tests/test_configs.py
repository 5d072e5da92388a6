"""The experiments in configs/: every method of configs/paper.py takes a finite update, and one of each
kind (prompt transform, sequence ratio, several updates per rollout, random token loss) trains end to
end on the built-in tasks."""

import importlib.util
import json
import os

import pytest

from tests.tiny import TINY, set_field, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PAPER = load("paper")
EXPERIMENTS = [("default", None)] + [("paper", f"method={m}") for m in
                                     ("grpo", "off_policy_schedule", "gspo", "minibatch4", "clip_cov")]


def test_paper_methods_cover_the_papers_table():
    assert {"grpo", "tp_schedule", "forking", "forking_schedule", "entropy_adv", "entropy_adv_schedule",
            "off_policy_schedule", "gspo"} <= set(PAPER.METHODS)
    c = PAPER.get_config("method=forking,schedule=cosine")  # keys after the method refine it
    assert (c.rl.credit.strategy, c.rl.schedule.mode, c.rl.credit.normalizer) == ("forking", "cosine", "valid_tokens")
    with pytest.raises(ValueError, match="method"):
        PAPER.get_config("method=nope")


@pytest.mark.parametrize("name,arg", EXPERIMENTS, ids=lambda x: x or "")
def test_config_trains(name, arg, tmp_path_factory):
    from tsched.train import trainer

    mod = load(name)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    tmp = tmp_path_factory.getbasetemp() / "configs"
    cfg = tiny(cfg, tmp, f"{name}-{arg}", rl__steps=3, sft__steps=4, eval__num_problems=20, train__kl_metrics=False)
    summary = json.load(open(trainer.run(cfg)))
    assert (summary["strategy"], summary["prompt_transform"]) == (cfg.rl.credit.strategy, cfg.rl.prompt_transform)
    rows = [json.loads(ln) for ln in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 3 and all(r["loss"] == r["loss"] for r in rl)  # no NaN
    # 3 steps, decay over int(3 * 0.8) = 2 of them: r = m (1 - 1/2) at the first step
    s = cfg.rl.schedule
    assert rl[0]["magnitude"] == pytest.approx(s.initial_magnitude * (0.5 if s.mode == "linear" else 1))
    assert rl[0]["logp_mismatch"] < 1e-4  # sampler and learner agree on every token


@pytest.mark.parametrize("method", list(PAPER.METHODS))
def test_every_method_takes_a_finite_update(method, tiny_model_cfg, tiny_params):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsched.train import learner

    cfg = PAPER.get_config(f"method={method}")
    for field, value in TINY.items():
        set_field(cfg, field, value)
    B, G, P, T = cfg.rl.prompts_per_step, cfg.rl.group_size, 6, 10
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, T + 1, B * G)
    batch = {"prompts": jnp.asarray(rng.integers(4, 32, (B, P)), jnp.int32), "prompt_lens": jnp.full((B,), P),
             "completions": jnp.asarray(np.where(np.arange(T) < lengths[:, None], rng.integers(4, 32, (B * G, T)), 0),
                                        jnp.int32),
             "lengths": jnp.asarray(lengths, jnp.int32), "rewards": jnp.asarray(rng.integers(0, 2, B * G), jnp.float32)}
    tx = learner.make_optimizer(1e-2, 1.0)
    state = learner.init_state(jax.tree.map(jnp.copy, tiny_params), tx, jax.random.key(0))
    state, m = learner.make_rl_step(cfg, tiny_model_cfg, tx)(state, None, batch)
    assert int(state["step"]) == 1 and np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(state["params"]),
                                                                       jax.tree.leaves(tiny_params))]
    assert max(moved) > 0


@pytest.mark.parametrize("name,chips", [("qwen3_4b_tpu", 8), ("qwen3_8b_tpu", 4)])
def test_tpu_configs_are_valid_for_their_slice(name, chips):
    """The TPU configs (planned in the README with tsched.plan) pass validation on their chip count."""
    from tsched.config import validate

    cfg = load(name).get_config()
    validate(cfg, num_devices=chips)
    assert cfg.model.dtype == "bfloat16" and cfg.rl.prompts_per_step == 64 and cfg.rl.max_new_tokens >= 4096
