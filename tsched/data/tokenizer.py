"""Sentencepiece tokenizer: trained offline on the task corpus, or loaded from any `.model` file."""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Thin wrapper with the ids tsched needs; any sentencepiece model with pad and eos ids works."""

    def __init__(self, model_path: str):
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {model_path!r} has no eos id; RL sampling needs one to stop")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids, dropping pad and stopping at the first eos."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(i)
        return self.sp.decode(out)


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Tokenizer:
    """Trains a unigram model with digits split into single tokens, so numbers tokenize uniformly."""
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type="unigram",
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    # Write atomically: a killed run must never leave a half-written model that a resume would load.
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)


def load_or_train(model_path: str, cache_path: str, corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Loads `model_path` if given, else the cached model at `cache_path`, else trains it there."""
    if model_path:
        return Tokenizer(model_path)
    if os.path.exists(cache_path):
        return Tokenizer(cache_path)
    return train_tokenizer(corpus, cache_path, vocab_size)
