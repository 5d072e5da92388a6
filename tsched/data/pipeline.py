"""grain input pipelines over a problem set: render the prompt template, tokenize, pad to static
shapes, shuffle, batch.

Problem sets (`open_splits`): the built-in task suite (`data.source=tasks`, a TFDS dataset built on
first use) or user files read by `tsched.data.sources` (`jsonl`, `parquet`, `tfds`). Both give
random-access sources of the same record schema, so SFT, RL, reference prefixes, the tokenizer corpus
and evaluation read them the same way.

Layout shared by SFT, RL and evaluation (and by the model's score pass): a prompt is LEFT-padded to
`prompt_len` tokens, so every prompt ends at the same column and decoding writes the same cache slot
for the whole batch; a completion is RIGHT-padded after it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import grain
import numpy as np

from tsched import config as config_lib
from tsched.data import sources as sources_lib
from tsched.data import templates, tfds_builder
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
    """Record -> prompt [P] (left-padded), prompt_len, and for SFT the target completion [S].

    The prompt is the problem rendered by `template` (tsched.data.templates; `chat_template` and
    `special_tokens`, a tuple of (name, token) pairs, for `chat`). A top-level dataclass (not a
    closure) so grain can ship it to worker processes.
    """

    tokenizer_path: str
    prompt_len: int
    solution_len: int = 0  # 0 = no SFT target
    template: str = "plain"
    chat_template: str = ""
    thinking: bool = False
    special_tokens: tuple = ()

    def prompt_text(self, problem: str) -> str:
        return templates.render(self.template, problem, self.chat_template or None, self.thinking,
                                dict(self.special_tokens))

    def prompt_ids(self, problem: str, tok: tok_lib.Tokenizer | None = None) -> list[int]:
        """The prompt's token ids: a chat template's text holds its own special tokens; other prompts get
        the tokenizer's (an HF tokenizer's post-processor, e.g. Llama-3's BOS), as transformers encodes them."""
        tok = tok or _tokenizer(self.tokenizer_path)
        return tok.encode(self.prompt_text(problem), add_special_tokens=self.template != "chat")

    def map(self, record):
        tok = _tokenizer(self.tokenizer_path)
        r = tfds_builder.decode(record)
        prompt = self.prompt_ids(r["problem"], tok)
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
                                    cfg.seed, d.get("solution_error_rate", 0.0))


def encoder(cfg, tok: tok_lib.Tokenizer | None, solutions: bool = False) -> Encode:
    """The configured `Encode` (template, chat template of the checkpoint), with SFT targets of
    `data.max_solution_tokens` tokens if `solutions`; `tok` None gives one for `prompt_text` only."""
    chat, special = "", ()
    if cfg.data.template == "chat":
        chat_dir = config_lib.chat_template_dir(cfg)
        chat = templates.load_chat_template(chat_dir)
        special = tuple(sorted(templates.load_special_tokens(chat_dir).items()))
    return Encode(tok.path if tok else "", cfg.data.prompt_len, cfg.data.max_solution_tokens if solutions else 0,
                  cfg.data.template, chat, cfg.data.chat_thinking, special)


def open_splits(cfg) -> dict:
    """{'train': source, 'eval': source, 'eval_sets': {name: source}} for the configured problem sets.

    `data.source=tasks`: the TFDS splits of the built-in suite (built on first use, cached in
    `config.data_dir(cfg)`), one eval set named 'eval'. A reader name: `data.train_files` as one
    source, `data.eval_files` as one source per named set ('eval' = all of them, in spec order).
    A bad file or record raises `ConfigError` naming the field, before anything is written.
    """
    d = cfg.data
    if d.get("source", "tasks") == "tasks":
        splits = tfds_builder.build(_task_config(cfg), os.path.join(config_lib.data_dir(cfg), "tfds")).as_data_source()
        return {"train": splits["train"], "eval": splits["eval"], "eval_sets": {"eval": splits["eval"]}}
    kw = dict(fields=sources_lib.Fields(**d.fields.to_dict()), skip_bad_records=d.skip_bad_records,
              default_verifier=d.verifier, data_dir=d.data_dir)
    try:
        train = sources_lib.open_source(d.source, d.train_files, default_name="train", **kw)
    except ValueError as e:
        raise config_lib.ConfigError(f"config field 'data.train_files' = {d.train_files!r}: {e}") from None
    try:
        evals = sources_lib.open_sets(d.source, d.eval_files, **kw)
    except ValueError as e:
        raise config_lib.ConfigError(f"config field 'data.eval_files' = {d.eval_files!r}: {e}") from None
    every = sources_lib.Source([r for s in evals.values() for r in s.records])
    return {"train": train, "eval": every, "eval_sets": evals}


def check_solutions(cfg, train_source) -> None:
    """SFT targets and `reference_prefix` need a reference solution in every train record: ConfigError
    naming `data.fields.solution` otherwise."""
    needs = [why for why, on in (("sft.steps > 0", config_lib.sft_steps(cfg) > 0),
                                 ("rl.prompt_transform=reference_prefix", cfg.rl.prompt_transform == "reference_prefix"))
             if on]
    if not needs or cfg.data.get("source", "tasks") == "tasks":  # built-in problems all have solutions
        return
    missing = sum(not tfds_builder.decode(train_source[i])["solution"] for i in range(len(train_source)))
    if missing:
        raise config_lib.ConfigError(
            f"config field 'data.fields.solution' = {cfg.data.fields.solution!r}: {missing} of {len(train_source)} "
            f"train records have no reference solution, which {' and '.join(needs)} need")


def tokenizer_cache_path(cfg) -> str:
    """Where the tokenizer trained on this problem set is cached: named by the dataset and vocabulary
    (for files: by the spec, field names and each file's size and modification time)."""
    if cfg.data.get("source", "tasks") == "tasks":
        name = f"{_task_config(cfg).name}_v{cfg.tokenizer.vocab_size}.model"
    else:
        d = cfg.data
        files = sorted({f for _, patterns in sources_lib.parse_spec(d.train_files) for p in patterns
                        for f in (sources_lib._files(p) if d.source != "tfds" else [p])})
        stat = [(f, os.path.getsize(f), os.path.getmtime(f)) if os.path.isfile(f) else (f,) for f in files]
        key = json.dumps([d.source, d.train_files, d.fields.to_dict(), stat], sort_keys=True)
        name = f"{d.source}_{hashlib.sha1(key.encode()).hexdigest()[:12]}_v{cfg.tokenizer.vocab_size}.model"
    if cfg.data.get("template", "plain") != "plain":  # the corpus holds the rendered prompts
        name = f"{name[:-len('.model')]}_t{hashlib.sha1(cfg.data.template.encode()).hexdigest()[:8]}.model"
    return os.path.join(config_lib.data_dir(cfg), "tokenizers", name)


def check_budgets(sources, tok: tok_lib.Tokenizer, prompt_len: int, solution_len: int, encode: Encode | None = None
                  ) -> dict:
    """Token counts of every prompt (`encode.prompt_ids`: the rendered template; the bare problem without
    `encode`) and reference solution against the static budgets.

    Raises `ConfigError` naming `data.prompt_len` if a prompt does not fit (it could not be sampled).
    Returns {'max_prompt_tokens', 'solutions_cut'}: the fraction of solutions (with EOS) longer than
    `solution_len`, which SFT and reference prefixes see cut.
    """
    longest, cut, n = 0, 0, 0
    for source in sources:
        for i in range(len(source)):
            r = tfds_builder.decode(source[i])
            prompt = encode.prompt_ids(r["problem"], tok) if encode else tok.encode(r["problem"])
            longest = max(longest, len(prompt))
            cut += len(tok.encode(r["solution"])) + 1 > solution_len
            n += 1
    if longest > prompt_len:
        raise config_lib.ConfigError(f"config field 'data.prompt_len' = {prompt_len!r}: must be >= {longest}, the "
                                     f"longest prompt of the data in tokens")
    return {"max_prompt_tokens": longest, "solutions_cut": cut / max(n, 1)}


def corpus(source, render=lambda problem: problem) -> list[str]:
    """Texts a tokenizer is trained on: every problem (as `render` makes it a prompt) and solution of a
    split."""
    out = []
    for i in range(len(source)):
        r = tfds_builder.decode(source[i])
        out += [render(r["problem"]), r["solution"]]
    return out


def train_batches(source, encode: Encode, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled batches of `batch_size` rows; each epoch reshuffled; iterator state is checkpointable.

    With several processes, process i reads (and encodes) only its block of each batch: rows
    i * n .. (i + 1) * n - 1, n = batch_size / process_count. The blocks in process order are the batch
    one process reads, so the data order does not depend on the process count, and every process's
    iterator state is the same position (the step): one process's state restores them all."""
    per = batch_size // process_count
    blocks = (grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(encode)
              .batch(per, drop_remainder=True))
    return blocks[process_index::process_count].to_iter_dataset()


def eval_batches(source, encode: Encode, num: int, batch_size: int) -> list[dict]:
    """The first `num` eval problems in fixed order, in batches of a static size (last one padded).

    Each batch carries `valid` [B] marking real rows, so padded rows never count in accuracy.
    """
    num = min(num, len(source))
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
