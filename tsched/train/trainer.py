"""The RLVR run: data and tokenizer, SFT warm start, evaluation, scheduled RL, evaluation, summary.

Data is the built-in task suite or the user's files (`data.source`, tsched.data.pipeline.open_splits);
the model is fresh or the Hugging Face checkpoint `model.init_from` (with its tokenizer and end ids,
and no toy SFT unless `sft.steps` says so); `train.export_hf` writes the final policy to `<run_dir>/hf`.

Resume order (`train.resume=True` on the same run_dir): the tokenizer and dataset are found in the data
cache (`config.data_dir`); the SFT result is restored from `ckpt/sft` (it is also the reference policy); the RL state, RNG key and data
iterator state from the latest `ckpt/rl` step; RL continues at the next step with the same batches and
the same per-step sampling keys (`fold_in(key, step)`), so the result equals an uninterrupted run.
Without resume, an existing run_dir is moved aside (never deleted) and the run starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from tsched import config as config_lib
from tsched import eval as eval_lib
from tsched import export as export_lib
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


def _prepare_run_dir(cfg) -> None:
    if os.path.isdir(cfg.run_dir) and not cfg.train.resume and os.listdir(cfg.run_dir):
        aside = f"{cfg.run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(cfg.run_dir, aside)
        print(f"run_dir {cfg.run_dir} existed and train.resume=False: moved it to {aside}")
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))


def run(cfg) -> str:
    """Runs the configured experiment; returns the path of its summary.json.

    Order: everything that can reject the config (validation, the token budgets of the data) comes
    before anything is written to the run directory.
    """
    t_start = time.time()
    validate(cfg)

    # ---- Data and tokenizer (cached outside the run directory, see config.data_dir)
    splits = pipeline.open_splits(cfg)
    pipeline.check_solutions(cfg, splits["train"])
    tok_path = config_lib.tokenizer_path(cfg)  # tokenizer.model_path, else the checkpoint's
    if tok_path:
        tok = tok_lib.load(tok_path)
    else:
        render = pipeline.encoder(cfg, None).prompt_text
        tok = tok_lib.load_or_train("", pipeline.tokenizer_cache_path(cfg), pipeline.corpus(splits["train"], render),
                                    cfg.tokenizer.vocab_size)
    P = cfg.data.prompt_len
    encode = pipeline.encoder(cfg, tok)
    budgets = pipeline.check_budgets([splits["train"], *splits["eval_sets"].values()], tok, P,
                                     cfg.data.max_solution_tokens, encode)

    _prepare_run_dir(cfg)
    run_dir = cfg.run_dir
    eval_sets = {name: pipeline.eval_batches(src, encode, cfg.eval.num_problems, cfg.eval.batch_size)
                 for name, src in splits["eval_sets"].items()}

    # ---- Model (fresh, or the checkpoint of model.init_from), sharded over the mesh
    mesh = sharding.make_mesh(cfg.mesh)
    key = jax.random.key(cfg.seed)
    if cfg.model.init_from:
        model_cfg, hf_params = model_lib.pretrained(cfg.model)
        param_shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh)
        params = jax.device_put(hf_params, param_shardings)
        del hf_params
    else:
        model_cfg = model_lib.config_from(cfg.model, tok.vocab_size)
        param_shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_cfg), mesh)
        params = jax.jit(lambda k: model_lib.init_params(model_cfg, k), out_shardings=param_shardings)(
            jax.random.fold_in(key, 0))
    print(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters"
          f"{' from ' + cfg.model.init_from if cfg.model.init_from else ''}, vocab {tok.vocab_size}, "
          f"stop ids {list(tok.stop_ids)}, mesh {dict(mesh.shape)}, devices {jax.device_count()} x "
          f"{jax.devices()[0].platform}; longest prompt {budgets['max_prompt_tokens']} of {P} tokens, "
          f"{100 * budgets['solutions_cut']:.1f}% of solutions cut at {cfg.data.max_solution_tokens}")

    sft_ckpt = Checkpointer(os.path.join(run_dir, "ckpt", "sft"), keep=1)
    rl_ckpt = Checkpointer(os.path.join(run_dir, "ckpt", "rl"), keep=cfg.train.keep_checkpoints)
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
            sft_ckpt.save(config_lib.sft_steps(cfg), params)

        # ---- Evaluation before RL (kept on disk so a resumed run reports it too)
        before_path = os.path.join(run_dir, "eval_before_rl.json")
        if cfg.train.resume and os.path.exists(before_path):
            before = json.load(open(before_path))
        else:
            before = eval_lib.evaluate_sets(cfg, model_cfg, params, eval_sets, tok, pool, eval_key)
            json.dump(before, open(before_path, "w"), indent=2)
        _print_eval("before RL", cfg, before)

        # ---- RL (with eval.every: the same evaluation every N steps, logged as eval/<set>/...)
        periodic = lambda p: eval_lib.flat_metrics(eval_lib.evaluate_sets(cfg, model_cfg, p, eval_sets, tok, pool,
                                                                          eval_key))
        params = _rl(cfg, model_cfg, params, splits["train"], tok, pool, rl_ckpt, writer, key, periodic)

        # ---- Evaluation after RL
        after = eval_lib.evaluate_sets(cfg, model_cfg, params, eval_sets, tok, pool, eval_key)
        _print_eval("after RL", cfg, after)
        with open(os.path.join(run_dir, "eval_after_rl.md"), "w") as f:
            f.write(eval_lib.markdown(after, f"{run_dir} after {cfg.rl.steps} RL steps"))

    # ---- Export (train.export_hf): the final policy as a Hugging Face directory
    if cfg.train.export_hf:
        print(f"exported the final policy to {export_lib.export_hf(os.path.join(run_dir, 'hf'), model_cfg, params, tok, cfg.model.init_from)}")
    writer.close()
    sft_ckpt.close()
    rl_ckpt.close()
    plot_curves(writer.path, os.path.join(run_dir, "curves.png"))

    per_set_before, per_set_after = before, after
    before, after = eval_lib.pooled(per_set_before), eval_lib.pooled(per_set_after)
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
        "eval_per_set_before_rl": eval_lib.flat_metrics(per_set_before),
        "eval_per_set_after_rl": eval_lib.flat_metrics(per_set_after),
        "init_from": cfg.model.init_from, "data_source": cfg.data.source, "template": cfg.data.template,
        "rl_steps": cfg.rl.steps, "strategy": cfg.rl.credit.strategy, "schedule": cfg.rl.schedule.mode,
        "prompt_transform": cfg.rl.prompt_transform, "loss": cfg.rl.loss, "seed": cfg.seed,
        "model_params": model_cfg.num_params(), "wall_time_s": time.time() - t_start,
    }
    path = os.path.join(run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return path


def _print_eval(when: str, cfg, per_set: dict) -> None:
    for name, r in per_set.items():
        print(f"eval {when}{'' if len(per_set) == 1 else ' [' + name + ']'}: avg@{cfg.eval.samples} "
              f"{r['sampled']['accuracy']:.3f}, greedy {r['greedy']['accuracy']:.3f}")


def _sft(cfg, model_cfg, params, train_source, tok, writer):
    """Supervised warm start on the reference solutions (`config.sft_steps` steps: none by default
    from a pretrained checkpoint)."""
    steps = config_lib.sft_steps(cfg)
    if steps == 0:
        return params
    tx = learner.make_optimizer(cfg.sft.lr, 1.0, cfg.sft.warmup_steps, steps)
    state = learner.init_state(params, tx)
    step_fn = learner.make_sft_step(model_cfg, tx)
    encode = pipeline.encoder(cfg, tok, solutions=True)
    it = iter(pipeline.train_batches(train_source, encode, cfg.sft.batch_size, seed=cfg.seed + 1))
    bar = tqdm(range(1, steps + 1), desc="SFT", disable=not cfg.train.progress, dynamic_ncols=True)
    for step in bar:
        b = next(it)
        state, m = step_fn(state, b["prompt"], b["prompt_len"], b["target"], b["target_len"])
        if step % cfg.train.log_every == 0 or step == steps:
            m = jax.device_get(m)
            writer.write(step, m, phase="sft")
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
    return state["params"]


def _rl(cfg, model_cfg, params, train_source, tok, pool, ckpt, writer, key, periodic_eval=None):
    """Scheduled RL; checkpoints every `train.checkpoint_every` steps and at the end.

    The step number of each iteration is read from the train state (`state['step'] + 1`), the counter
    the jitted update computes its schedule from: sampling keys, the prompt transform, logs and
    checkpoints all use that one number.
    """
    rl = cfg.rl
    encode = pipeline.encoder(cfg, tok, solutions=True)
    scfg = SamplingConfig(max_new_tokens=rl.max_new_tokens, eos_id=tok.stop_ids, pad_id=tok.pad_id,
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

    step = int(state["step"]) + 1
    bar = tqdm(total=rl.steps, initial=step - 1, desc="RL", disable=not cfg.train.progress, dynamic_ncols=True)
    while step <= rl.steps:
        r = float(schedules.magnitude(step, rl.schedule))
        sample_key, _ = learner.step_keys(state["rng"], step)
        ro = rollout.generate(model_cfg, scfg, state["params"], next(it), sample_key, tok, pool, rl.prompt_transform, r)
        t0 = time.perf_counter()
        state, m = rl_step(state, ref_params, ro.learner_batch())
        m = {**jax.device_get(m), **ro.metrics(), "update_s": time.perf_counter() - t0}
        if int(state["step"]) != step:
            raise RuntimeError(f"the update advanced the step counter to {int(state['step'])}, expected {step}")
        if periodic_eval is not None and cfg.eval.every and step % cfg.eval.every == 0:
            m.update(periodic_eval(state["params"]))
        writer.write(step, m)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", r=f"{m['magnitude']:.2f}", tok_s=f"{m['sample_tokens_per_s']:.0f}")
        if step % cfg.train.log_every == 0 or step == rl.steps:
            tqdm.write(summary_line(step, rl.steps, m))
        if step % cfg.train.checkpoint_every == 0 or step == rl.steps:
            ckpt.save(step, state, it.get_state())
        step += 1
    bar.close()
    return state["params"]
