"""One path from prompts to rewards, used by the RL loop, evaluation and the bench alike.

    batch of prompts ─▶ prompt transform(r) ─▶ sampler (G per prompt) ─▶ detokenize ─▶ verifier pool

A prompt transform is how a schedule acts on the data side: it rewrites the prompt batch from the
schedule magnitude r before sampling. `reference_prefix` is the paper's off-policy strategy: the first
round(r L) tokens of a verified reference solution become context, and the policy continues from there.
Transforms are registered by name (`rl.prompt_transform`) and work on host numpy batches.

Rows: prompt b owns sampled rows b*G .. b*G+G-1; every per-prompt field is repeated G times here, once.

Several processes (tsched.multihost): each passes its own prompt rows; they are sampled as one batch
(every process's prompts, in process order), and each process decodes and scores the rows of its own
prompts in its own verifier pool. The sampler's outputs stay global arrays; the metrics cover all rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from tsched import multihost, sharding
from tsched.registry import make_registry
from tsched.sampling.sampler import SamplingConfig, sample
from tsched.verify.pool import STATUSES

PROMPT_TRANSFORMS, register_transform = make_registry()


@register_transform("none")
def no_transform(batch: dict, r: float, pad_id: int, eos_id: int) -> dict:
    return batch


@register_transform("reference_prefix")
def reference_prefix(batch: dict, r: float, pad_id: int, eos_id: int) -> dict:
    """Off-policy guidance: the first round(r * L) tokens of each reference solution (L tokens without
    its EOS, at most L - 1 so the policy always writes the end) move into the prompt as context.

    prompt [B, P] + target [B, S] -> prompt [B, P + S] (left-padded, static shape), plus `prefix` [B, S]
    (right-padded) and `prefix_len` [B], so the reward judges prefix + completion as one response.
    """
    prompt, plen, target, tlen = batch["prompt"], batch["prompt_len"], batch["target"], batch["target_len"]
    B, P = prompt.shape
    S = target.shape[1]
    out_prompt = np.full((B, P + S), pad_id, np.int32)
    prefix = np.full((B, S), pad_id, np.int32)
    prefix_len = np.zeros(B, np.int32)
    for i in range(B):
        L = int(tlen[i]) - int(tlen[i] > 0 and target[i, tlen[i] - 1] == eos_id)  # the solution without EOS
        k = min(int(np.floor(r * L + 0.5)), max(L - 1, 0))
        ids = np.concatenate([prompt[i, P - plen[i]:], target[i, :k]])
        out_prompt[i, P + S - len(ids):] = ids
        prefix[i, :k] = target[i, :k]
        prefix_len[i] = k
    return {**batch, "prompt": out_prompt, "prompt_len": plen + prefix_len, "prefix": prefix, "prefix_len": prefix_len}


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What one batch of prompts produced. N = B * G rows."""

    prompts: Any  # [B, P'] left-padded prompts as sampled (after the transform); this process's
    prompt_lens: Any  # [B]; this process's
    tokens: Any  # [N, T] sampled completions, EOS included, padding after; all processes' rows
    lengths: Any  # [N]; all processes' rows
    logp: Any  # [N, T] the sampler's log-prob of each sampled token at its temperature; all processes' rows
    texts: list  # [N] the judged responses: prefix (if any) + completion, decoded; this process's
    rewards: np.ndarray  # [N] float32; this process's
    verdicts: list  # [N] tsched.verify.pool.Verdict; this process's
    sample_s: float
    verify_s: float

    def learner_batch(self) -> dict:
        """The arrays the jitted RL update takes (tsched.train.learner.make_rl_step): host arrays of this
        process's rows and global arrays, as `sharding.place_batch` takes them."""
        return {"prompts": self.prompts, "prompt_lens": self.prompt_lens, "completions": self.tokens,
                "lengths": self.lengths, "rewards": self.rewards, "sample_logp": self.logp}

    def metrics(self) -> dict:
        """Reward, verdict shares, verifier latency, and sampling throughput, over every process's rows."""
        rewards, status, lat = multihost.all_rows((self.rewards, np.array([STATUSES.index(v.status) for v in self.verdicts]),
                                                   np.array([v.latency_s for v in self.verdicts])))
        out = {f"verify_{s}": float(np.mean(status == i)) for i, s in enumerate(STATUSES)}
        n_tokens = float(np.sum(multihost.fetch(self.lengths)))
        out.update(accuracy=float(np.mean(rewards == 1.0)), sample_s=self.sample_s, verify_s=self.verify_s,
                   sample_tokens_per_s=n_tokens / max(self.sample_s, 1e-9),
                   verify_latency_p50_s=float(np.percentile(lat, 50)),
                   verify_latency_p99_s=float(np.percentile(lat, 99)))
        return out


def repeat(x, G: int):
    """A per-prompt array [B, ...] as per-row [B * G, ...]."""
    return np.repeat(np.asarray(x), G, axis=0)


def generate(model_cfg, scfg: SamplingConfig, params, batch: dict, key, tok, pool, transform: str = "none",
             r: float = 0.0, max_new_per_row=None) -> Rollout:
    """Samples `scfg.num_samples` completions per prompt of `batch` and scores them.

    batch: host arrays from `tsched.data.pipeline` (`prompt` [B, P], `prompt_len`, `answer`, `verifier`,
    and `target`/`target_len` for transforms that need the reference solution); tok: anything with
    `decode(ids) -> str`, `pad_id` and `eos_id`; pool: a `tsched.verify.pool.VerifierPool`.
    max_new_per_row: optional int [N], each row's own token budget (the bench emulates varied response
    lengths with it; the sampler stops decoding a row there).
    """
    G = scfg.num_samples
    batch = PROMPT_TRANSFORMS[transform](batch, r, tok.pad_id, tok.eos_id)
    prompts, prompt_lens, caps = batch["prompt"], batch["prompt_len"], max_new_per_row
    if jax.process_count() > 1:  # one batch of every process's prompts (small host arrays), on every device
        whole = sharding.replicated(sharding.mesh_of(params))
        prompts, prompt_lens, caps = (None if x is None else sharding.place_whole(multihost.all_rows(np.asarray(x)), whole)
                                      for x in (prompts, prompt_lens, caps))
    t0 = time.perf_counter()
    out = jax.block_until_ready(sample(model_cfg, scfg, params, prompts, prompt_lens, key, max_new_per_row=caps))
    t1 = time.perf_counter()
    tokens, lengths = multihost.own_rows(multihost.fetch((out["tokens"], out["lengths"])))
    rows = [list(tokens[i, : lengths[i]]) for i in range(len(tokens))]
    if "prefix" in batch:
        prefix, prefix_len = repeat(batch["prefix"], G), repeat(batch["prefix_len"], G)
        rows = [list(prefix[i, : prefix_len[i]]) + row for i, row in enumerate(rows)]
    texts = [tok.decode(row) for row in rows]
    verdicts = pool.score(texts, list(repeat(batch["answer"], G)), list(repeat(batch["verifier"], G)))
    t2 = time.perf_counter()
    return Rollout(prompts=batch["prompt"], prompt_lens=batch["prompt_len"], tokens=out["tokens"],
                   lengths=out["lengths"], logp=out["logp"], texts=texts,
                   rewards=np.array([v.reward for v in verdicts], np.float32), verdicts=verdicts,
                   sample_s=t1 - t0, verify_s=t2 - t1)
