"""Evaluation of a policy on held-out problem sets, through the same rollout path as RL.

Accuracy is avg@k: the mean correctness of k samples per problem at a temperature (k = 1 and
temperature 0 give greedy accuracy). At the RL sampling temperature avg@k estimates the expected
reward RL maximises, so it is the headline; greedy accuracy is reported beside it, with the unbiased
pass@k of the same samples (Chen et al. 2021), the mean response length and the fraction of responses
cut at the token budget.

As a command, on a run directory (its latest RL checkpoint, else its SFT one) or a Hugging Face
checkpoint directory, for every eval set of the config:

    python -m tsched.eval --config=configs/qwen3_math.py --checkpoint=runs/qwen3_math \\
        [--out=DIR] [--config.data.eval_files=...] [--config.eval.samples=16]

writes `eval.json` and a Markdown table `eval.md` to `--out` (default: the checkpoint directory) and
prints the path of `eval.json` last. Pass the config the run was trained with (a run directory holds
no model definition of its own beyond it); for an HF directory `model.init_from` is set to it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from tsched import multihost, rollout
from tsched.sampling.sampler import SamplingConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the large binomials."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def sampling_configs(cfg, tok) -> dict[str, SamplingConfig]:
    """{'greedy', 'sampled'} sampling settings of the configured evaluation."""
    stops = getattr(tok, "stop_ids", (tok.eos_id,))  # every end id of a checkpoint's tokenizer
    base = SamplingConfig(max_new_tokens=cfg.rl.max_new_tokens, eos_id=stops, pad_id=tok.pad_id,
                          temperature=0.0, cache_dtype=cfg.rl.cache_dtype, prompts_per_pass=cfg.rl.prompts_per_pass)
    return {"greedy": base,
            "sampled": dataclasses.replace(base, temperature=cfg.eval.temperature, top_p=cfg.rl.top_p,
                                           top_k=cfg.rl.top_k, num_samples=cfg.eval.samples)}


def evaluate(model_cfg, scfg: SamplingConfig, params, batches, tok, pool, key, pass_k=()) -> dict:
    """Accuracy over the eval `batches` (from `tsched.data.pipeline.eval_batches`), overall and per family,
    the unbiased pass@k for each k in `pass_k` (<= samples), mean response length in tokens, and the
    fraction of responses truncated (no stop id within `max_new_tokens`)."""
    correct, families, lengths, truncated = [], [], [], []
    k = scfg.num_samples
    stops = np.asarray(scfg.stop_ids or (-1,))
    for i, b in enumerate(batches):  # every process holds every batch, and samples and scores its block of it
        ro = rollout.generate(model_cfg, scfg, params, multihost.own_rows(b), jax.random.fold_in(key, i), tok, pool)
        valid = rollout.repeat(b["valid"], k)  # padding rows of the last batch never count
        correct += list(multihost.all_rows(ro.rewards)[valid] == 1.0)
        families += list(rollout.repeat(b["family"], k)[valid])
        n_tok, toks = (x[valid] for x in multihost.fetch((ro.lengths, ro.tokens)))
        last = toks[np.arange(len(toks)), np.maximum(n_tok - 1, 0)]
        lengths += list(n_tok)
        truncated += list((n_tok == scfg.max_new_tokens) & ~np.isin(last, stops))
    correct, families = np.array(correct), np.array(families)
    counts = correct.reshape(-1, k).sum(axis=1)  # rows b*k .. b*k+k-1 are problem b's samples
    return {"accuracy": float(correct.mean()), "problems": int(len(correct)) // k, "samples_per_problem": k,
            "temperature": scfg.temperature,
            "pass_at_k": {str(j): float(np.mean([pass_at_k(k, int(c), j) for c in counts])) for j in pass_k if j <= k},
            "mean_length": float(np.mean(lengths)), "truncated": float(np.mean(truncated)),
            "correct_counts": [int(c) for c in counts],
            "per_family": {f: float(correct[families == f].mean()) for f in sorted(set(families))}}


def evaluate_all(cfg, model_cfg, params, batches, tok, pool, key) -> dict:
    """{'greedy': ..., 'sampled': ...} results of `evaluate` with the configured settings."""
    from tsched.config import pass_ks

    return {name: evaluate(model_cfg, scfg, params, batches, tok, pool, key,
                           pass_ks(cfg) if name == "sampled" else ())
            for name, scfg in sampling_configs(cfg, tok).items()}


def evaluate_sets(cfg, model_cfg, params, sets: dict, tok, pool, key) -> dict:
    """{set name: `evaluate_all` result} for eval batches per set ({name: batches})."""
    return {name: evaluate_all(cfg, model_cfg, params, batches, tok, pool, jax.random.fold_in(key, i))
            for i, (name, batches) in enumerate(sets.items())}


def pooled(per_set: dict) -> dict:
    """One {'greedy', 'sampled'} result over all sets (accuracies weighted by problems), for headlines."""
    out = {}
    for mode in ("greedy", "sampled"):
        rs = [r[mode] for r in per_set.values()]
        n = sum(r["problems"] for r in rs)
        out[mode] = {"accuracy": sum(r["accuracy"] * r["problems"] for r in rs) / n, "problems": n,
                     "per_family": {f"{s}/{f}" if len(per_set) > 1 else f: v for s, r in per_set.items()
                                    for f, v in r[mode]["per_family"].items()}}
    return out


def flat_metrics(per_set: dict) -> dict:
    """Scalars `eval/<set>/<metric>` for the metrics writer."""
    out = {}
    for name, r in per_set.items():
        g, s = r["greedy"], r["sampled"]
        out[f"eval/{name}/greedy_accuracy"] = g["accuracy"]
        out[f"eval/{name}/avg@{s['samples_per_problem']}"] = s["accuracy"]
        out.update({f"eval/{name}/pass@{k}": v for k, v in s["pass_at_k"].items()})
        out[f"eval/{name}/mean_length"] = s["mean_length"]
        out[f"eval/{name}/truncated"] = s["truncated"]
    return out


def markdown(per_set: dict, title: str = "") -> str:
    """A Markdown table, one row per eval set."""
    first = next(iter(per_set.values()))["sampled"]
    k, ks = first["samples_per_problem"], list(first["pass_at_k"])
    head = ["set", "problems", "greedy", f"avg@{k}", *[f"pass@{j}" for j in ks], "mean length", "truncated"]
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in per_set.items():
        g, s = r["greedy"], r["sampled"]
        row = [name, str(g["problems"]), f"{g['accuracy']:.3f}", f"{s['accuracy']:.3f}",
               *[f"{s['pass_at_k'][j]:.3f}" for j in ks], f"{s['mean_length']:.1f}", f"{s['truncated']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def load_policy(cfg, checkpoint: str):
    """(ModelConfig, params, tokenizer, description) of a run directory's latest RL (else SFT)
    checkpoint, or of a Hugging Face directory (config.json inside; `cfg.model.init_from` is set to it)."""
    import jax.numpy as jnp

    from tsched import config as config_lib
    from tsched import model as model_lib
    from tsched.data import pipeline, tokenizer as tok_lib
    from tsched.train.checkpoint import restore_params

    if os.path.isfile(os.path.join(checkpoint, "config.json")) and not os.path.isdir(os.path.join(checkpoint, "ckpt")):
        cfg.model.init_from = checkpoint
        cfg.model.preset = ""
        config_lib.validate(cfg)
        model_cfg, params = model_lib.pretrained(cfg.model)
        tok = tok_lib.load(config_lib.tokenizer_path(cfg))
        return model_cfg, jax.tree.map(jnp.asarray, params), tok, f"Hugging Face checkpoint {checkpoint}"
    config_lib.validate(cfg)
    path = config_lib.tokenizer_path(cfg) or pipeline.tokenizer_cache_path(cfg)
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--checkpoint={checkpoint!r}: the run's tokenizer {path} is missing "
                                     "(pass the config the run was trained with)")
    tok = tok_lib.load(path)
    for phase in ("rl", "sft"):
        d = os.path.join(checkpoint, "ckpt", phase)
        steps = sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []
        if steps:
            params = restore_params(os.path.abspath(os.path.join(d, str(steps[-1]), "state")))
            if cfg.model.init_from:
                model_cfg, _ = model_lib.pretrained(cfg.model, weights=False)
            else:
                model_cfg = model_lib.config_from(cfg.model, tok.vocab_size)
            return model_cfg, jax.tree.map(jnp.asarray, params), tok, f"{phase} step {steps[-1]} of {checkpoint}"
    raise config_lib.ConfigError(f"--checkpoint={checkpoint!r}: neither a run directory with checkpoints "
                                 "(ckpt/rl, ckpt/sft) nor a Hugging Face directory (config.json)")


def run_eval(cfg, checkpoint: str, out_dir: str = "") -> str:
    """Evaluates `checkpoint` on the config's eval sets; returns the path of the eval.json written."""
    from tsched.data import pipeline
    from tsched.verify.pool import VerifierPool

    model_cfg, params, tok, what = load_policy(cfg, checkpoint)
    splits = pipeline.open_splits(cfg)
    encode = pipeline.encoder(cfg, tok)
    pipeline.check_budgets(splits["eval_sets"].values(), tok, cfg.data.prompt_len, cfg.data.max_solution_tokens,
                           encode)
    sets = {name: pipeline.eval_batches(src, encode, cfg.eval.num_problems, cfg.eval.batch_size)
            for name, src in splits["eval_sets"].items()}
    with VerifierPool(cfg.verify.num_workers, cfg.verify.timeout_s, cfg.verify.memory_mb, cfg.verify.max_chars) as pool:
        per_set = evaluate_sets(cfg, model_cfg, params, sets, tok, pool, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    out_dir = out_dir or checkpoint
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval.json")
    report = {"checkpoint": what, "max_new_tokens": cfg.rl.max_new_tokens, "template": cfg.data.template,
              "sets": per_set}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(per_set, f"Evaluation of {what}")
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(table)
    print(table)
    return path


def main(argv):
    from absl import flags, logging

    from tsched.config import ConfigError
    from tsched.main import config_error

    if len(argv) > 1:
        config_error(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    try:
        print(run_eval(FLAGS.config, FLAGS.checkpoint, FLAGS.out))
    except ConfigError as e:
        config_error(str(e))


if __name__ == "__main__":
    from absl import app, flags

    from tsched.main import parse_flags  # defines --config, as for training

    flags.DEFINE_string("checkpoint", None, "A run directory or a Hugging Face checkpoint directory.", required=True)
    flags.DEFINE_string("out", "", "Where eval.json and eval.md go (default: the checkpoint directory).")
    app.run(main, flags_parser=parse_flags)
