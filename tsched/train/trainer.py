"""The RLVR run: data and tokenizer, SFT warm start, evaluation, scheduled RL, evaluation, summary.

Data is the built-in task suite or the user's files (`data.source`, tsched.data.pipeline.open_splits);
the model is fresh or the Hugging Face checkpoint `model.init_from` (with its tokenizer and end ids,
and no toy SFT unless `sft.steps` says so); `train.export_hf` writes the final policy to `<run_dir>/hf`.

`sft.warm_start` names another run directory whose final SFT checkpoint replaces this run's SFT (validated
to be the SFT this config would run, `config.WARM_START_FIELDS`): several RL runs share one SFT. Its
evaluation before RL is taken too when its config agrees on `config.EVAL_FIELDS` (same parameters, key
and settings: the same result; `eval.reuse_warm_start=False` computes it again).

Resume order (`train.resume=auto` or `True` on the same run_dir, with a checkpoint in it): the run_dir's
`config.json` is compared with the config (fields that change the result must match unless
`train.force_resume`); the tokenizer and dataset are found in the data cache (`config.data_dir`); SFT
state and its data iterator state come from the latest `ckpt/sft` step (SFT continues if it was not
finished; its final parameters are also the reference policy); the evaluation before RL from
`eval_before_rl.json`; the RL state, RNG key and data iterator state from the latest `ckpt/rl` step. Each
phase continues at the step after its checkpoint with the same batches and the same per-step keys
(`fold_in(key, step)`), and `metrics.jsonl` drops the lines of steps after it, so parameters and log equal
an uninterrupted run's. A step that does not restore is moved aside and the one before it is used.
Without resume (`never`), an existing run_dir is moved aside (never deleted) and the run starts afresh.

Stopping (tsched.main turns each into one line on stderr and an exit status):
- SIGTERM / SIGINT: inside SFT or RL the current step finishes, a checkpoint is written and `Preempted`
  is raised (exit status EXIT_PREEMPTED = 143); elsewhere (setup, evaluation) everything done so far is
  on disk already and it is raised at once. A second signal exits at once.
- `train.max_bad_steps` non-finite steps in a row (each skipped inside the jitted step, see
  `learner.skip_if_not_finite`): checkpoint, `TooManyBadSteps` (EXIT_BAD_STEPS = 3).
- A checkpoint that cannot be written: `checkpoint.CheckpointError` naming the path (EXIT_CHECKPOINT = 4);
  the previous checkpoints stay.

Several processes (multi-host, `mesh.num_processes`, tsched.multihost): every process runs this same
loop over one mesh. Each reads its block of every batch and scores its own rows; all take part in every
checkpoint (Orbax writes each process's shards); only process 0 writes the run directory's files (config,
logs, plots, evaluations, summary). Inside the SFT and RL step loops a signal or a checkpoint timer seen
by one process is agreed on at the end of each step, so all save and stop at the same step (a TPU
preemption signals every host); elsewhere a signal stops the process it reached, and the others fail
once the distributed service notices. Decisions read from the run directory (resume or not, which
checkpoint, whether the evaluation before RL is on disk) are process 0's.

With the environment variable TSCHED_TRACE_EVENTS=1 the run prints `tsched-event: <name> [<step>]` lines
on stderr at phase boundaries, steps and saves: the fault-injection tests kill the run at such moments.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
from etils import epath
from tqdm import tqdm

from tsched import config as config_lib
from tsched import eval as eval_lib
from tsched import export as export_lib
from tsched import model as model_lib
from tsched import multihost, rollout, sharding
from tsched.config import ConfigError, resume_mode, validate
from tsched.data import pipeline, tokenizer as tok_lib
from tsched.rl import schedules
from tsched.sampling.sampler import SamplingConfig
from tsched.train import learner
from tsched.train.checkpoint import Checkpointer, CheckpointError, complete_steps
from tsched.train.metrics import MetricsWriter, plot_curves, summary_line
from tsched.verify.pool import VerifierPool


EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job that stopped on SIGTERM
EXIT_BAD_STEPS = 3
EXIT_CHECKPOINT = 4
RESUME_HINT = "rerun the same command with --config.train.resume=auto to continue"


class RunStopped(Exception):
    """The run stopped early on purpose; `exit_status` is what tsched.main exits with."""

    exit_status = 1


class Preempted(RunStopped):
    exit_status = EXIT_PREEMPTED


class TooManyBadSteps(RunStopped):
    exit_status = EXIT_BAD_STEPS


def exit_status(e: BaseException) -> int | None:
    """The exit status for an exception that ends a run on purpose (None: not one of those)."""
    if isinstance(e, RunStopped):
        return e.exit_status
    if isinstance(e, CheckpointError):
        return EXIT_CHECKPOINT
    return None


def _event(name: str, *args) -> None:
    """A phase event for the fault-injection tests (only with TSCHED_TRACE_EVENTS=1)."""
    if os.environ.get("TSCHED_TRACE_EVENTS"):
        print(" ".join(["tsched-event:", name, *map(str, args)]), file=sys.stderr, flush=True)


class _Signals:
    """SIGTERM / SIGINT handling for the duration of a run (main thread only; elsewhere a no-op).

    While `deferred` (inside a step loop) the first signal is only recorded: the loop finishes its step,
    checkpoints and raises `Preempted`. Outside (setup, evaluation: what is done is on disk) it raises
    `Preempted` at once. A second signal exits the process at once.
    """

    def __init__(self):
        self.received: str | None = None
        self.deferred = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            print(f"tsched: second signal ({name}): exiting at once; {RESUME_HINT} from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_PREEMPTED)
        self.received = name
        if self.deferred:
            print(f"tsched: {name}: finishing the current step, then writing a checkpoint "
                  f"(send it again to exit at once)", file=sys.stderr, flush=True)
        else:
            raise Preempted(f"stopped by {name} outside a training step (what was done is on disk); {RESUME_HINT}")


# Fields that may differ between a run_dir's config.json and the config resuming it: where things are,
# how often to log and checkpoint, the mesh and the SFT's slicing (both change only the order of float sums),
# the verifier pool's size. Everything else changes the result.
_RESUME_FREE = ("run_dir", "data.data_dir", "train.", "mesh.", "verify.num_workers", "eval.batch_size",
                "rl.prompts_per_pass", "sft.micro_batches", "sft.length_buckets")


def _checkpoint_dirs(run_dir) -> dict:
    return {phase: epath.Path(run_dir) / "ckpt" / phase for phase in ("sft", "rl")}


def _resolve_resume(cfg) -> bool:
    """Whether this run continues the run_dir's checkpoints; raises ConfigError (before any write) when it
    must not: `always` without a checkpoint, or a run_dir written by a config that changes the result."""
    mode = resume_mode(cfg)
    has_checkpoint = any(complete_steps(d) for d in _checkpoint_dirs(cfg.run_dir).values())
    if mode == "always" and not has_checkpoint:
        raise ConfigError(f"config field 'train.resume' = 'always': no checkpoint in {cfg.run_dir} "
                          f"(use auto to start afresh when there is none)")
    if mode == "never" or not has_checkpoint:
        return False
    path = epath.Path(cfg.run_dir) / "config.json"
    diffs = config_lib.config_differences(cfg, path.read_text(), free=_RESUME_FREE) if path.exists() else []
    if diffs and not cfg.train.force_resume:
        raise ConfigError(f"config field 'train.resume' = {cfg.train.resume!r}: {cfg.run_dir} was written by a "
                          f"different config ({'; '.join(diffs)}); set train.force_resume=True to resume it "
                          f"anyway, or train.resume=never to move it aside and start afresh")
    if diffs:
        _say(f"train.force_resume: resuming {cfg.run_dir} despite config differences: {'; '.join(diffs)}")
    return True


def _write_atomically(path, text: str) -> None:
    """A kill leaves either the old file or the new one, never half of it (local or object store). Only
    process 0 writes the run directory's files."""
    if not multihost.is_main():
        return
    tmp = epath.Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _prepare_run_dir(cfg, resuming: bool) -> epath.Path:
    """The run directory (a local path or e.g. gs://), created; an earlier run there is moved aside (by
    process 0, once every process has decided whether it resumes)."""
    run_dir = epath.Path(cfg.run_dir)
    multihost.barrier("resume_decided")
    if multihost.is_main():
        if run_dir.is_dir() and resume_mode(cfg) == "never" and any(run_dir.iterdir()):
            aside = run_dir.parent / f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir.rename(aside)
            print(f"run_dir {cfg.run_dir} existed and train.resume=never: moved it to {aside}")
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / "config.json", cfg.to_json_best_effort(indent=2))
    multihost.barrier("run_dir_ready")
    return run_dir


class _Saver:
    """When to checkpoint inside a step loop, and the end of a step: save if due (every
    `train.checkpoint_every` steps, every `train.checkpoint_every_s` seconds, the last step), or when a
    signal or too many bad steps stop the run, which then raises."""

    def __init__(self, cfg, phase: str, last: int, ckpt: Checkpointer, signals: _Signals):
        self.cfg, self.phase, self.last, self.ckpt, self.signals = cfg, phase, last, ckpt, signals
        self.t_saved = time.monotonic()
        self.skipped_steps = 0  # non-finite steps skipped so far (restored from the checkpoint)
        self.bad_in_a_row = 0

    def data_state(self, it) -> dict:
        return {"iterator": it.get_state(), "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row}

    def restore_counts(self, data: dict) -> dict:
        """-> the iterator state of a saved data item (older checkpoints held only that)."""
        if "iterator" not in data:
            return data
        self.skipped_steps, self.bad_in_a_row = int(data["skipped_steps"]), int(data["bad_in_a_row"])
        return data["iterator"]

    def count(self, skipped: float) -> None:
        self.skipped_steps += int(skipped > 0)
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped > 0 else 0

    def end_of_step(self, step: int, state, it) -> None:
        every_s = self.cfg.train.checkpoint_every_s
        too_many = self.bad_in_a_row >= self.cfg.train.max_bad_steps  # the same in every process
        # A signal or the timer of one process saves (and stops) all of them at this step; both are read
        # once, here, so the save and the stop cannot disagree.
        stop, timer = multihost.agree(self.signals.received is not None,
                                      every_s > 0 and time.monotonic() - self.t_saved >= every_s)
        if stop and not self.signals.received:
            self.signals.received = "a signal to another process"
        due = step % self.cfg.train.checkpoint_every == 0 or step == self.last or timer
        where = epath.Path(self.ckpt.directory) / str(step)
        if due or too_many or stop:
            _event(f"{self.phase}_save_start", step)
            self.ckpt.save(step, state, self.data_state(it))
            self.t_saved = time.monotonic()
            _event(f"{self.phase}_save_end", step)
        if too_many:
            raise TooManyBadSteps(
                f"{self.bad_in_a_row} non-finite {self.phase.upper()} steps in a row (train.max_bad_steps = "
                f"{self.cfg.train.max_bad_steps}), the last at step {step}: stopped; {where} holds the last good "
                f"parameters (skipped steps leave them unchanged). Lower the learning rate or check the data, then "
                f"resume with --config.train.resume=auto")
        if stop:  # as agreed above: a signal arriving since then stops the next step, which saves first
            raise Preempted(f"stopped by {self.signals.received} after {self.phase.upper()} step {step}; "
                            f"checkpoint {where} written; {RESUME_HINT}")


def run(cfg) -> str:
    """Runs the configured experiment; returns the path of its summary.json.

    Order: everything that can reject the config (validation, the token budgets of the data, a run_dir
    it must not resume) comes before anything is written to the run directory. Raises `RunStopped` or
    `CheckpointError` when the run stops early (see the module docstring).
    """
    t_start = time.time()
    multihost.initialize(cfg.mesh)  # before anything asks JAX for its devices
    validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    # Under the mesh, the jitted steps trace with the model's activations pinned to it (sharding.pin_rows).
    with _Signals() as signals, jax.set_mesh(mesh):
        return _run(cfg, t_start, signals, mesh)


def _run(cfg, t_start, signals, mesh) -> str:
    _event("start")

    # ---- Data and tokenizer (cached outside the run directory, see config.data_dir; built by process 0
    # first where the processes share that cache)
    splits, tok = multihost.main_first(lambda: _data_and_tokenizer(cfg), "data_cache")
    P = cfg.data.prompt_len
    encode = pipeline.encoder(cfg, tok)
    budgets = pipeline.check_budgets([splits["train"], *splits["eval_sets"].values()], tok, P,
                                     cfg.data.max_solution_tokens, encode)

    resuming = bool(multihost.from_main(_resolve_resume(cfg)))
    run_dir = _prepare_run_dir(cfg, resuming)
    eval_sets = {name: pipeline.eval_batches(src, encode, cfg.eval.num_problems, cfg.eval.batch_size)
                 for name, src in splits["eval_sets"].items()}

    # ---- Model (fresh, or the checkpoint of model.init_from), sharded over the mesh
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
    _say(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters"
         f"{' from ' + cfg.model.init_from if cfg.model.init_from else ''}, vocab {tok.vocab_size}, "
         f"stop ids {list(tok.stop_ids)}, mesh {dict(mesh.shape)}, devices {jax.device_count()} x "
         f"{jax.devices()[0].platform}; longest prompt {budgets['max_prompt_tokens']} of {P} tokens, "
         f"{100 * budgets['solutions_cut']:.1f}% of solutions cut at {cfg.data.max_solution_tokens}"
         f"{f', {jax.process_count()} processes' if jax.process_count() > 1 else ''}")

    dirs = _checkpoint_dirs(run_dir)
    sft_ckpt = Checkpointer(dirs["sft"], keep=cfg.train.keep_checkpoints)
    rl_ckpt = Checkpointer(dirs["rl"], keep=cfg.train.keep_checkpoints)
    writer = MetricsWriter(run_dir, active=multihost.is_main())
    eval_key = jax.random.fold_in(key, 1)
    _event("setup_done")

    with VerifierPool(cfg.verify.num_workers, cfg.verify.timeout_s, cfg.verify.memory_mb,
                      cfg.verify.max_chars) as pool:
        # ---- SFT warm start (its result is also the reference policy for KL)
        params, sft_was_done = _sft(cfg, model_cfg, params, splits["train"], tok, writer, sft_ckpt, signals,
                                    resuming)

        # ---- Evaluation before RL (kept on disk so a resumed run reports it too)
        before_path = run_dir / "eval_before_rl.json"
        before_from = cfg.sft.warm_start if multihost.from_main(_warm_start_eval(cfg)) else ""
        if multihost.from_main(resuming and sft_was_done and before_path.exists()):
            before = json.loads(before_path.read_text())
        elif before_from:
            before = json.loads((epath.Path(before_from) / "eval_before_rl.json").read_text())
            _write_atomically(before_path, json.dumps(before, indent=2))
            _say(f"evaluation before RL: the one of {before_from} (same parameters, key and settings)")
        else:
            _event("eval_before_start")
            before = eval_lib.evaluate_sets(cfg, model_cfg, params, eval_sets, tok, pool, eval_key)
            _write_atomically(before_path, json.dumps(before, indent=2))
            _event("eval_before_end")
        _print_eval("before RL", cfg, before)

        # ---- RL (with eval.every: the same evaluation every N steps, logged as eval/<set>/...)
        evaluate = lambda p: eval_lib.evaluate_sets(cfg, model_cfg, p, eval_sets, tok, pool, eval_key)
        params, last_eval = _rl(cfg, model_cfg, params, splits["train"], tok, pool, rl_ckpt, writer, key, signals,
                                resuming, evaluate)

        # ---- Evaluation after RL (the last step's periodic one when this launch ran it: same params and key)
        _event("eval_after_start")
        after = last_eval if last_eval is not None else evaluate(params)
        _event("eval_after_end")
        _print_eval("after RL", cfg, after)
        _write_atomically(run_dir / "eval_after_rl.md", eval_lib.markdown(after, f"{run_dir} after {cfg.rl.steps} RL steps"))

    # ---- Export (train.export_hf): the final policy as a Hugging Face directory
    if cfg.train.export_hf:
        host_params = multihost.fetch(params)  # every process takes part in gathering the shards
        if multihost.is_main():
            _say(f"exported the final policy to "
                 f"{export_lib.export_hf(str(run_dir / 'hf'), model_cfg, host_params, tok, cfg.model.init_from)}")
    writer.close()
    sft_ckpt.close()
    rl_ckpt.close()
    if multihost.is_main():
        plot_curves(writer.path, run_dir / "curves.png")

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
        "sft_warm_start": cfg.sft.warm_start, "eval_before_rl_from": before_from,
        "model_params": model_cfg.num_params(), "wall_time_s": time.time() - t_start,
    }
    path = run_dir / "summary.json"
    _write_atomically(path, json.dumps(summary, indent=2))
    _event("done")
    return str(path)


def _warm_start_eval(cfg) -> bool:
    """Whether the `sft.warm_start` run's evaluation before RL is this run's (`eval.reuse_warm_start`): its
    SFT is ours (validated) and its config agrees on `config.EVAL_FIELDS`, so it evaluated the same
    parameters with the same key and settings."""
    if not (cfg.sft.warm_start and cfg.eval.reuse_warm_start):
        return False
    warm = epath.Path(cfg.sft.warm_start)
    return (warm / "eval_before_rl.json").exists() and not config_lib.eval_differences(
        cfg, (warm / "config.json").read_text())


def _stop_if_signalled(signals: _Signals, phase: str, step: int, ckpt: Checkpointer) -> None:
    """After a phase's last step (checkpointed): a signal that came after the step's own check stops here."""
    if multihost.agree(signals.received is not None)[0]:
        raise Preempted(f"stopped by {signals.received or 'a signal to another process'} after {phase.upper()} "
                        f"step {step}; checkpoint {epath.Path(ckpt.directory) / str(step)} written; {RESUME_HINT}")


def _say(line: str) -> None:
    """A progress line on stdout, from process 0 only."""
    if multihost.is_main():
        print(line)


def _data_and_tokenizer(cfg):
    """-> (the problem-set splits, the tokenizer): the configured one, or one trained on the train split
    (cached)."""
    splits = pipeline.open_splits(cfg)
    pipeline.check_solutions(cfg, splits["train"])
    tok_path = config_lib.tokenizer_path(cfg)  # tokenizer.model_path, else the checkpoint's
    if tok_path:
        return splits, tok_lib.load(tok_path)
    render = pipeline.encoder(cfg, None).prompt_text
    return splits, tok_lib.load_or_train("", pipeline.tokenizer_cache_path(cfg),
                                         pipeline.corpus(splits["train"], render), cfg.tokenizer.vocab_size)


def _train_batches(source, encode, batch_size: int, seed: int):
    """This process's block of every batch (tsched.data.pipeline.train_batches)."""
    return iter(pipeline.train_batches(source, encode, batch_size, seed, jax.process_index(), jax.process_count()))


def _print_eval(when: str, cfg, per_set: dict) -> None:
    for name, r in per_set.items():
        _say(f"eval {when}{'' if len(per_set) == 1 else ' [' + name + ']'}: avg@{cfg.eval.samples} "
             f"{r['sampled']['accuracy']:.3f}, greedy {r['greedy']['accuracy']:.3f}")


def _sft(cfg, model_cfg, params, train_source, tok, writer, ckpt, signals, resuming):
    """Supervised warm start on the reference solutions (`config.sft_steps` steps: none by default from a
    pretrained checkpoint), checkpointed like RL (state and data iterator).

    -> (parameters, whether a finished SFT was restored)."""
    steps = config_lib.sft_steps(cfg)
    if steps == 0:
        return params, True
    tx = learner.make_optimizer(cfg.sft.lr, 1.0, cfg.sft.warmup_steps, steps)
    state = learner.init_state(params, tx)
    if cfg.sft.warm_start:  # another run's final SFT state, restored like our own (validate checked it matches)
        warm = Checkpointer(epath.Path(config_lib.warm_start_checkpoint(cfg)).parent, read_only=True)
        state, _ = warm.restore(steps, state, with_data=False)
        warm.close()
        _say(f"SFT warm start: step {steps} of {cfg.sft.warm_start}")
        return state["params"], True
    mesh = sharding.mesh_of(params)
    step_fn = learner.make_sft_step(model_cfg, tx, mesh, cfg.sft.micro_batches, cfg.sft.length_buckets)
    encode = pipeline.encoder(cfg, tok, solutions=True)
    it = _train_batches(train_source, encode, cfg.sft.batch_size, cfg.seed + 1)
    saver = _Saver(cfg, "sft", steps, ckpt, signals)
    restored = ckpt.restore_latest(state) if resuming else None
    if restored:
        _, state, data_state = restored
        it.set_state(saver.restore_counts(data_state))
    step = int(state["step"]) + 1
    writer.resume("sft", step - 1)
    if step > steps:
        return state["params"], True
    if restored:
        _say(f"resumed SFT at step {step - 1}")
    bar = tqdm(total=steps, initial=step - 1, desc="SFT", disable=not cfg.train.progress or not multihost.is_main(),
               dynamic_ncols=True)
    signals.deferred = True
    while step <= steps:
        b = next(it)
        state, m = step_fn(state, *sharding.place_batch((b["prompt"], b["prompt_len"], b["target"], b["target_len"]),
                                                        mesh))
        saver.count(float(m["skipped"]))  # one scalar per step: max_bad_steps counts every step, not logged ones
        if step % cfg.train.log_every == 0 or step == steps:
            m = {**jax.device_get(m), "skipped_steps": saver.skipped_steps}
            writer.write(step, m, phase="sft")
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
        bar.update(1)
        _event("sft_step", step)
        saver.end_of_step(step, state, it)
        step += 1
    signals.deferred = False
    _stop_if_signalled(signals, "sft", steps, ckpt)
    bar.close()
    return state["params"], False


def _rl(cfg, model_cfg, params, train_source, tok, pool, ckpt, writer, key, signals, resuming, periodic_eval=None):
    """Scheduled RL; checkpoints every `train.checkpoint_every` steps (and `checkpoint_every_s` seconds)
    and at the end. `periodic_eval(params) -> per-set results` runs every `eval.every` steps, logged as
    eval/<set>/... metrics. Returns (final params, the last step's periodic evaluation or None).

    The step number of each iteration is read from the train state (`state['step'] + 1`), the counter
    the jitted update computes its schedule from: sampling keys, the prompt transform, logs and
    checkpoints all use that one number. A non-finite step is skipped inside the update but still
    advances the counter (see `learner.skip_if_not_finite`).
    """
    rl = cfg.rl
    encode = pipeline.encoder(cfg, tok, solutions=True)
    scfg = SamplingConfig(max_new_tokens=rl.max_new_tokens, eos_id=tok.stop_ids, pad_id=tok.pad_id,
                          temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, num_samples=rl.group_size,
                          cache_dtype=rl.cache_dtype, prompts_per_pass=rl.prompts_per_pass)
    tx = learner.make_optimizer(rl.lr, rl.max_grad_norm, rl.warmup_steps)
    ref_params = params if learner.needs_reference(cfg) else None
    # The update donates its state, so the policy must not share buffers with the reference policy.
    state = learner.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.fold_in(key, 2))
    mesh = sharding.mesh_of(params)
    rl_step = learner.make_rl_step(cfg, model_cfg, tx, mesh)
    it = _train_batches(train_source, encode, rl.prompts_per_step, cfg.seed + 2)
    saver = _Saver(cfg, "rl", rl.steps, ckpt, signals)
    restored = ckpt.restore_latest(state) if resuming else None
    if restored:
        _, state, data_state = restored
        it.set_state(saver.restore_counts(data_state))
        _say(f"resumed RL at step {int(state['step'])}")
    writer.resume("rl", int(state["step"]))

    bar = tqdm(total=rl.steps, initial=int(state["step"]), desc="RL", disable=not cfg.train.progress or not multihost.is_main(),
               dynamic_ncols=True)
    signals.deferred = True
    last_eval = None  # the periodic evaluation of the latest step, if it had one
    while (step := int(state["step"]) + 1) <= rl.steps:
        r = float(schedules.magnitude(step, rl.schedule))
        sample_key, _ = learner.step_keys(state["rng"], step)
        ro = rollout.generate(model_cfg, scfg, state["params"], next(it), sample_key, tok, pool, rl.prompt_transform, r)
        t0 = time.perf_counter()
        state, m = rl_step(state, ref_params, sharding.place_batch(ro.learner_batch(), mesh))
        m = {**jax.device_get(m), **ro.metrics(), "update_s": time.perf_counter() - t0}
        saver.count(m["skipped"])
        last_eval = None
        if periodic_eval is not None and cfg.eval.every and step % cfg.eval.every == 0:
            last_eval = periodic_eval(state["params"])
            m.update(eval_lib.flat_metrics(last_eval))
        writer.write(step, {**m, "skipped_steps": saver.skipped_steps})
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", r=f"{m['magnitude']:.2f}", tok_s=f"{m['sample_tokens_per_s']:.0f}")
        if (step % cfg.train.log_every == 0 or step == rl.steps) and multihost.is_main():
            tqdm.write(summary_line(step, rl.steps, m))
            writer.flush()
        _event("rl_step", step)
        saver.end_of_step(step, state, it)
    signals.deferred = False
    _stop_if_signalled(signals, "rl", rl.steps, ckpt)
    bar.close()
    return state["params"], last_eval
