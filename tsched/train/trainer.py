"""The RLVR run: data and tokenizer, SFT warm start, evaluation, scheduled RL, evaluation, summary.

Resume order (`train.resume=True` on the same run_dir): the tokenizer and dataset are found in the data
cache (`config.data_dir`); the SFT result is restored from `ckpt/sft` (it is also the reference policy); the RL state, RNG key and data
iterator state from the latest `ckpt/rl` step; RL continues at the next step with the same batches and
the same per-step sampling keys (`fold_in(key, step)`), so the result equals an uninterrupted run.
Without resume, an existing run_dir is moved aside (never deleted) and the run starts afresh.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from etils import epath
from tqdm import tqdm

from tsched import eval as eval_lib
from tsched import model as model_lib
from tsched import rollout, sharding
from tsched.config import validate
from tsched.data import pipeline, tokenizer as tok_lib
from tsched.rl import schedules
from tsched.sampling.sampler import SamplingConfig
from tsched.train import learner
from tsched.train.checkpoint import Checkpointer
from tsched.train.metrics import MetricsWriter, plot_curves, summary_line
from tsched.verify.pool import VerifierPool


def _prepare_run_dir(cfg) -> epath.Path:
    """The run directory (a local path or e.g. gs://), created; an earlier run there is moved aside."""
    run_dir = epath.Path(cfg.run_dir)
    if run_dir.is_dir() and not cfg.train.resume and any(run_dir.iterdir()):
        aside = run_dir.parent / f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.rename(aside)
        print(f"run_dir {cfg.run_dir} existed and train.resume=False: moved it to {aside}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    return run_dir


def run(cfg) -> str:
    """Runs the configured experiment; returns the path of its summary.json.

    Order: everything that can reject the config (validation, the token budgets of the data) comes
    before anything is written to the run directory.
    """
    t_start = time.time()
    validate(cfg)

    # ---- Data and tokenizer (cached outside the run directory, see config.data_dir)
    splits = pipeline.open_splits(cfg)
    tok = tok_lib.load_or_train(cfg.tokenizer.model_path, pipeline.tokenizer_cache_path(cfg),
                                pipeline.corpus(splits["train"]), cfg.tokenizer.vocab_size)
    P = cfg.data.prompt_len
    budgets = pipeline.check_budgets(splits.values(), tok, P, cfg.data.max_solution_tokens)

    run_dir = _prepare_run_dir(cfg)
    model_cfg = model_lib.config_from(cfg.model, tok.vocab_size)
    eval_batches = pipeline.eval_batches(splits["eval"], pipeline.Encode(tok.path, P), cfg.eval.num_problems,
                                         cfg.eval.batch_size)

    # ---- Model, sharded over the mesh
    mesh = sharding.make_mesh(cfg.mesh)
    param_shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh)
    key = jax.random.key(cfg.seed)
    params = jax.jit(lambda k: model_lib.init_params(model_cfg, k), out_shardings=param_shardings)(
        jax.random.fold_in(key, 0))
    print(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
          f"mesh {dict(mesh.shape)}, devices {jax.device_count()} x {jax.devices()[0].platform}; "
          f"longest prompt {budgets['max_prompt_tokens']} of {P} tokens, "
          f"{100 * budgets['solutions_cut']:.1f}% of solutions cut at {cfg.data.max_solution_tokens}")

    sft_ckpt = Checkpointer(run_dir / "ckpt" / "sft", keep=1)
    rl_ckpt = Checkpointer(run_dir / "ckpt" / "rl", keep=cfg.train.keep_checkpoints)
    resume_sft = cfg.train.resume and sft_ckpt.latest_step() is not None
    resume_rl = (rl_ckpt.latest_step() or 0) if cfg.train.resume else 0
    writer = MetricsWriter(run_dir, resume_step=resume_rl, keep_sft=resume_sft)
    eval_key = jax.random.fold_in(key, 1)

    with VerifierPool(cfg.verify.num_workers, cfg.verify.timeout_s, cfg.verify.memory_mb,
                      cfg.verify.max_chars) as pool:
        # ---- SFT warm start (its result is also the reference policy for KL)
        if resume_sft:
            params, _ = sft_ckpt.restore(sft_ckpt.latest_step(), params, with_data=False)
        else:
            params = _sft(cfg, model_cfg, params, splits["train"], tok, writer)
            sft_ckpt.save(cfg.sft.steps, params)

        # ---- Evaluation before RL (kept on disk so a resumed run reports it too)
        before_path = run_dir / "eval_before_rl.json"
        if cfg.train.resume and before_path.exists():
            before = json.loads(before_path.read_text())
        else:
            before = eval_lib.evaluate_all(cfg, model_cfg, params, eval_batches, tok, pool, eval_key)
            before_path.write_text(json.dumps(before, indent=2))
        print(f"eval before RL: avg@{cfg.eval.samples} {before['sampled']['accuracy']:.3f}, "
              f"greedy {before['greedy']['accuracy']:.3f}")

        # ---- RL
        params = _rl(cfg, model_cfg, params, splits["train"], tok, pool, rl_ckpt, writer, key)

        # ---- Evaluation after RL
        after = eval_lib.evaluate_all(cfg, model_cfg, params, eval_batches, tok, pool, eval_key)
        print(f"eval after RL: avg@{cfg.eval.samples} {after['sampled']['accuracy']:.3f}, "
              f"greedy {after['greedy']['accuracy']:.3f}")
    writer.close()
    sft_ckpt.close()
    rl_ckpt.close()
    plot_curves(writer.path, run_dir / "curves.png")

    summary = {
        "eval_accuracy_before_rl": before["sampled"]["accuracy"],
        "eval_accuracy_after_rl": after["sampled"]["accuracy"],
        "eval_accuracy_metric": f"avg@{cfg.eval.samples}, temperature {cfg.eval.temperature}",
        "eval_greedy_accuracy_before_rl": before["greedy"]["accuracy"],
        "eval_greedy_accuracy_after_rl": after["greedy"]["accuracy"],
        "eval_problems": after["greedy"]["problems"],
        "eval_per_family_before_rl": before["sampled"]["per_family"],
        "eval_per_family_after_rl": after["sampled"]["per_family"],
        "eval_greedy_per_family_before_rl": before["greedy"]["per_family"],
        "eval_greedy_per_family_after_rl": after["greedy"]["per_family"],
        "rl_steps": cfg.rl.steps, "strategy": cfg.rl.credit.strategy, "schedule": cfg.rl.schedule.mode,
        "prompt_transform": cfg.rl.prompt_transform, "loss": cfg.rl.loss, "seed": cfg.seed,
        "model_params": model_cfg.num_params(), "wall_time_s": time.time() - t_start,
    }
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return str(path)


def _sft(cfg, model_cfg, params, train_source, tok, writer):
    """Supervised warm start on the reference solutions."""
    if cfg.sft.steps == 0:
        return params
    tx = learner.make_optimizer(cfg.sft.lr, 1.0, cfg.sft.warmup_steps, cfg.sft.steps)
    state = learner.init_state(params, tx)
    step_fn = learner.make_sft_step(model_cfg, tx)
    encode = pipeline.Encode(tok.path, cfg.data.prompt_len, cfg.data.max_solution_tokens)
    it = iter(pipeline.train_batches(train_source, encode, cfg.sft.batch_size, seed=cfg.seed + 1))
    bar = tqdm(range(1, cfg.sft.steps + 1), desc="SFT", disable=not cfg.train.progress, dynamic_ncols=True)
    for step in bar:
        b = next(it)
        state, m = step_fn(state, b["prompt"], b["prompt_len"], b["target"], b["target_len"])
        if step % cfg.train.log_every == 0 or step == cfg.sft.steps:
            m = jax.device_get(m)
            writer.write(step, m, phase="sft")
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
    return state["params"]


def _rl(cfg, model_cfg, params, train_source, tok, pool, ckpt, writer, key):
    """Scheduled RL; checkpoints every `train.checkpoint_every` steps and at the end.

    The step number of each iteration is read from the train state (`state['step'] + 1`), the counter
    the jitted update computes its schedule from: sampling keys, the prompt transform, logs and
    checkpoints all use that one number.
    """
    rl = cfg.rl
    encode = pipeline.Encode(tok.path, cfg.data.prompt_len, cfg.data.max_solution_tokens)
    scfg = SamplingConfig(max_new_tokens=rl.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, num_samples=rl.group_size)
    tx = learner.make_optimizer(rl.lr, rl.max_grad_norm)
    need_ref = rl.kl_coef > 0 or cfg.train.kl_metrics
    ref_params = params if need_ref else None
    # The update donates its state, so the policy must not share buffers with the reference policy.
    state = learner.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.fold_in(key, 2))
    rl_step = learner.make_rl_step(cfg, model_cfg, tx)
    it = iter(pipeline.train_batches(train_source, encode, rl.prompts_per_step, seed=cfg.seed + 2))
    if cfg.train.resume and ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(ckpt.latest_step(), state)
        it.set_state(data_state)
        print(f"resumed RL at step {int(state['step'])}")

    bar = tqdm(total=rl.steps, initial=int(state["step"]), desc="RL", disable=not cfg.train.progress,
               dynamic_ncols=True)
    while (step := int(state["step"]) + 1) <= rl.steps:
        r = float(schedules.magnitude(step, rl.schedule))
        sample_key, _ = learner.step_keys(state["rng"], step)
        ro = rollout.generate(model_cfg, scfg, state["params"], next(it), sample_key, tok, pool, rl.prompt_transform, r)
        t0 = time.perf_counter()
        state, m = rl_step(state, ref_params, ro.learner_batch())
        m = {**jax.device_get(m), **ro.metrics(), "update_s": time.perf_counter() - t0}
        writer.write(step, m)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", r=f"{m['magnitude']:.2f}", tok_s=f"{m['sample_tokens_per_s']:.0f}")
        if step % cfg.train.log_every == 0 or step == rl.steps:
            tqdm.write(summary_line(step, rl.steps, m))
            writer.flush()
        if step % cfg.train.checkpoint_every == 0 or step == rl.steps:
            ckpt.save(step, state, it.get_state())
    bar.close()
    return state["params"]
