"""Tokenizers behind one small interface: sentencepiece `.model` files (trained offline on the task
corpus, or any other), and Hugging Face `tokenizer.json` files (via the `tokenizers` package) for
checkpoints that ship that instead. `load(path)` picks by file name."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Thin wrapper with the ids tsched needs; any sentencepiece model with pad and eos ids works.

    `eos_id` ends SFT targets; `stop_ids` (eos_id first) are every id that ends a sampled response."""

    def __init__(self, model_path: str):
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {model_path!r} has no eos id; RL sampling needs one to stop")
        self.stop_ids = (self.eos_id,)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (sentencepiece models here add no special tokens either way)."""
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids, dropping pad and stopping at the first stop id."""
        out, stops = [], set(self.stop_ids)
        for i in ids:
            i = int(i)
            if i in stops:
                break
            if i != self.pad_id:
                out.append(i)
        return self._decode(out)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A `tokenizer.json`; eos / pad tokens come from `tokenizer_config.json` beside it (or arguments).

    Stop ids: the eos token, then every `eos_token_id` of `generation_config.json` beside it (an int or
    a list: Qwen3 stops at `<|im_end|>` and `<|endoftext|>`), in that order, each once."""

    def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
        import json

        from tokenizers import Tokenizer as _HF

        self.path = path
        self.tok = _HF.from_file(path)
        meta_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        name = lambda t: t.get("content") if isinstance(t, dict) else t
        eos, pad = eos_token or name(meta.get("eos_token")), pad_token or name(meta.get("pad_token"))
        self.eos_id = self.tok.token_to_id(eos) if eos else None
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r}: no eos token (set eos_token in tokenizer_config.json)")
        pad_id = self.tok.token_to_id(pad) if pad else None
        self.pad_id = self.eos_id if pad_id is None else pad_id
        gen_path = os.path.join(os.path.dirname(path), "generation_config.json")
        gen = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
        more = gen.get("eos_token_id")
        more = [] if more is None else [more] if isinstance(more, int) else list(more)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *map(int, more)]))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token text (`<|im_start|>`) maps to its id either way, and
        `add_special_tokens` applies the tokenizer's post-processor (Llama-3's BOS), as transformers does
        for a plain prompt (a rendered chat template already holds its BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load(path: str) -> Tokenizer:
    """A `.json` path is a Hugging Face tokenizer, anything else a sentencepiece model."""
    return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Tokenizer:
    """Trains a unigram model with digits split into single tokens, so numbers tokenize uniformly."""
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type="unigram",
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    # Write atomically: a killed run must never leave a half-written model that a resume would load. The
    # temporary file is this writer's own, so runs training the same cached model at once do not collide.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(model_path)),
                               prefix=os.path.basename(model_path) + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(proto.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)


def load_or_train(model_path: str, cache_path: str, corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Loads `model_path` if given, else the cached model at `cache_path`, else trains it there."""
    if model_path:
        return load(model_path)
    if os.path.exists(cache_path):
        return Tokenizer(cache_path)
    return train_tokenizer(corpus, cache_path, vocab_size)
