"""grain input pipelines over the task dataset: tokenize, pad to static shapes, shuffle, batch.

Layout shared by SFT, RL and evaluation (and by the model's score pass): a prompt is LEFT-padded to
`prompt_len` tokens, so every prompt ends at the same column and decoding writes the same cache slot
for the whole batch; a completion is RIGHT-padded after it.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import grain
import numpy as np

from tsched.data import tfds_builder
from tsched.data import tokenizer as tok_lib


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> tok_lib.Tokenizer:
    return tok_lib.load(path)


def left_pad(ids: list[int], length: int, pad_id: int) -> np.ndarray:
    if len(ids) > length:
        raise ValueError(f"prompt of {len(ids)} tokens does not fit data.prompt_len={length}; raise data.prompt_len")
    out = np.full(length, pad_id, np.int32)
    out[length - len(ids):] = ids
    return out


def right_pad(ids: list[int], length: int, pad_id: int) -> np.ndarray:
    ids = ids[:length]
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out


@dataclasses.dataclass(frozen=True)
class Encode(grain.transforms.Map):
    """TFDS record -> prompt [P] (left-padded), prompt_len, and for SFT the target completion [S].

    A top-level dataclass (not a closure) so grain can ship it to worker processes.
    """

    tokenizer_path: str
    prompt_len: int
    solution_len: int = 0  # 0 = no SFT target

    def map(self, record):
        tok = _tokenizer(self.tokenizer_path)
        r = tfds_builder.decode(record)
        prompt = tok.encode(r["problem"])
        out = {"prompt": left_pad(prompt, self.prompt_len, tok.pad_id), "prompt_len": np.int32(len(prompt)),
               "answer": r["answer"], "verifier": r["verifier"], "family": r["family"],
               "difficulty": np.int32(r["difficulty"])}
        if self.solution_len:
            sol = tok.encode(r["solution"]) + [tok.eos_id]
            out["target"] = right_pad(sol, self.solution_len, tok.pad_id)
            out["target_len"] = np.int32(min(len(sol), self.solution_len))
        return out


def open_splits(cfg) -> dict:
    """TFDS data sources {'train', 'eval'} for the configured task suite (built on first use)."""
    d = cfg.data
    data_dir = d.data_dir or os.path.join(cfg.run_dir, "tfds")
    config = tfds_builder.task_config(d.families, d.min_difficulty, d.max_difficulty, d.train_size,
                                      d.eval_size, cfg.seed)
    return tfds_builder.build(config, data_dir).as_data_source()


def corpus(source) -> list[str]:
    """Texts a tokenizer is trained on: every problem and solution of a split."""
    out = []
    for i in range(len(source)):
        r = tfds_builder.decode(source[i])
        out += [r["problem"], r["solution"]]
    return out


def train_batches(source, encode: Encode, batch_size: int, seed: int) -> grain.IterDataset:
    """Endless shuffled batches; each epoch reshuffled; iterator state is checkpointable."""
    return (grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(encode)
            .batch(batch_size, drop_remainder=True).to_iter_dataset())


def eval_batches(source, encode: Encode, num: int, batch_size: int) -> list[dict]:
    """The first `num` eval problems in fixed order, in batches of a static size (last one padded).

    Each batch carries `valid` [B] marking real rows, so padded rows never count in accuracy.
    """
    ds = grain.MapDataset.source(source)[:num].map(encode)
    batches = []
    for start in range(0, num, batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, num))]
        valid = np.zeros(batch_size, bool)
        valid[: len(rows)] = True
        rows += [rows[-1]] * (batch_size - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["valid"] = valid
        batches.append(batch)
    return batches


def with_reference_prefix(batch: dict, magnitude: float, pad_id: int, eos_id: int) -> dict:
    """Off-policy guidance: the first round(r * L) tokens of each reference solution (L tokens without
    its EOS, at most L - 1 so the policy always writes the end) move into the prompt as context.

    prompt [B, P] + target [B, S] -> prompt [B, P + S] (left-padded, static shape), plus `prefix` [B, S]
    (right-padded) and `prefix_len` [B], so rewards can score prefix + completion as one response.
    """
    prompt, plen, target, tlen = batch["prompt"], batch["prompt_len"], batch["target"], batch["target_len"]
    B, P = prompt.shape
    S = target.shape[1]
    out_prompt = np.full((B, P + S), pad_id, np.int32)
    prefix = np.full((B, S), pad_id, np.int32)
    prefix_len = np.zeros(B, np.int32)
    for i in range(B):
        L = int(tlen[i]) - int(tlen[i] > 0 and target[i, tlen[i] - 1] == eos_id)  # the solution without EOS
        k = min(int(np.floor(magnitude * L + 0.5)), max(L - 1, 0))
        ids = np.concatenate([prompt[i, P - plen[i]:], target[i, :k]])
        out_prompt[i, P + S - len(ids):] = ids
        prefix[i, :k] = target[i, :k]
        prefix_len[i] = k
    return {**batch, "prompt": out_prompt, "prompt_len": plen + prefix_len, "prefix": prefix, "prefix_len": prefix_len}
