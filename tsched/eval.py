"""Evaluation of a policy on held-out problems, through the same rollout path as RL.

Accuracy is avg@k: the mean correctness of k samples per problem at a temperature (k = 1 and
temperature 0 give greedy accuracy). At the RL sampling temperature avg@k estimates the expected
reward RL maximises, so it is the headline; greedy accuracy is reported beside it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tsched import rollout
from tsched.sampling.sampler import SamplingConfig


def sampling_configs(cfg, tok) -> dict[str, SamplingConfig]:
    """{'greedy', 'sampled'} sampling settings of the configured evaluation."""
    base = SamplingConfig(max_new_tokens=cfg.rl.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          temperature=0.0)
    return {"greedy": base,
            "sampled": dataclasses.replace(base, temperature=cfg.eval.temperature, top_p=cfg.rl.top_p,
                                           top_k=cfg.rl.top_k, num_samples=cfg.eval.samples)}


def evaluate(model_cfg, scfg: SamplingConfig, params, batches, tok, pool, key) -> dict:
    """Accuracy over the eval `batches` (from `tsched.data.pipeline.eval_batches`), overall and per family."""
    correct, families = [], []
    k = scfg.num_samples
    for i, b in enumerate(batches):
        ro = rollout.generate(model_cfg, scfg, params, b, jax.random.fold_in(key, i), tok, pool)
        valid = rollout.repeat(b["valid"], k)  # padding rows of the last batch never count
        correct += list(ro.rewards[valid] == 1.0)
        families += list(rollout.repeat(b["family"], k)[valid])
    correct, families = np.array(correct), np.array(families)
    return {"accuracy": float(correct.mean()), "problems": int(len(correct)) // k, "samples_per_problem": k,
            "temperature": scfg.temperature,
            "per_family": {f: float(correct[families == f].mean()) for f in sorted(set(families))}}


def evaluate_all(cfg, model_cfg, params, batches, tok, pool, key) -> dict:
    """{'greedy': ..., 'sampled': ...} results of `evaluate` with the configured settings."""
    return {name: evaluate(model_cfg, scfg, params, batches, tok, pool, key)
            for name, scfg in sampling_configs(cfg, tok).items()}
