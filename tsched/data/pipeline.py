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

from tsched import config as config_lib
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


def _task_config(cfg) -> tfds_builder.TaskConfig:
    d = cfg.data
    return tfds_builder.task_config(d.families, d.min_difficulty, d.max_difficulty, d.train_size, d.eval_size,
                                    cfg.seed)


def open_splits(cfg) -> dict:
    """TFDS data sources {'train', 'eval'} for the configured task suite (built on first use, cached in
    `config.data_dir(cfg)`)."""
    return tfds_builder.build(_task_config(cfg), os.path.join(config_lib.data_dir(cfg), "tfds")).as_data_source()


def tokenizer_cache_path(cfg) -> str:
    """Where the tokenizer trained on this task suite is cached: named by the dataset and vocabulary."""
    name = f"{_task_config(cfg).name}_v{cfg.tokenizer.vocab_size}.model"
    return os.path.join(config_lib.data_dir(cfg), "tokenizers", name)


def check_budgets(sources, tok: tok_lib.Tokenizer, prompt_len: int, solution_len: int) -> dict:
    """Token counts of every prompt and reference solution against the static budgets.

    Raises `ConfigError` naming `data.prompt_len` if a prompt does not fit (it could not be sampled).
    Returns {'max_prompt_tokens', 'solutions_cut'}: the fraction of solutions (with EOS) longer than
    `solution_len`, which SFT and reference prefixes see cut.
    """
    longest, cut, n = 0, 0, 0
    for source in sources:
        for i in range(len(source)):
            r = tfds_builder.decode(source[i])
            longest = max(longest, len(tok.encode(r["problem"])))
            cut += len(tok.encode(r["solution"])) + 1 > solution_len
            n += 1
    if longest > prompt_len:
        raise config_lib.ConfigError(f"config field 'data.prompt_len' = {prompt_len!r}: must be >= {longest}, the "
                                     f"longest prompt of the data in tokens")
    return {"max_prompt_tokens": longest, "solutions_cut": cut / max(n, 1)}


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
