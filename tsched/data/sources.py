"""Problem sets from user files (JSONL, Parquet) or any TFDS dataset, as random-access sources.

A source is a `Sequence` of records with the keys and types of the built-in task records, so
`grain.MapDataset.source(source)`, `pipeline.Encode` (whose `tfds_builder.decode` passes str / int
through unchanged) and `pipeline.corpus` work on it as on the built-in TFDS splits:

    {"problem": str, "answer": str, "solution": str ("" if none), "verifier": str,
     "family": str, "difficulty": int}

Spec syntax (`data.train_files`, `data.eval_files`): named sets separated by `;`, each
`[name=]pattern[,pattern...]`, e.g. `gsm8k=data/gsm8k/test.jsonl;math500=data/math/*.parquet`. A
set name is letters, digits, `_`, `.`, `-`; without one, each file's records get the file's stem as
family (a path whose first part is a `key=value` directory needs a set name in front). Patterns are
paths or globs (`**` recursive), each expanded in sorted order, patterns in the given order, a file
named twice read once: the record order is deterministic, so grain's seeded shuffles reproduce. For
the `tfds` reader a pattern is `name[/config][:version]@split` (TFDS split syntax, e.g.
`gsm8k@test`, `my_set/v2@train[:90%]`), read from `data_dir` with `tfds.data_source` (array_record
files, no TensorFlow, no download).

Records are read and checked when the source opens (problem sets are small; any bad record is
reported before training starts): a record without a problem, with an answer that is missing,
empty, or neither a string nor a finite number, an unknown verifier name, or a JSONL line that is
not a JSON object raises ValueError naming the file, the line (JSONL, 1-based) or row / record
(Parquet, TFDS; 0-based) and the field, unless `skip_bad_records`, which drops it and counts it in
`Source.skipped`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import numbers
import os
import re
from typing import Iterator, Mapping

import numpy as np

from tsched.registry import make_registry
from tsched.verify.verifiers import VERIFIERS

# name -> read(pattern, data_dir) -> iterator of (label, family, rows); rows: (where, dict | ValueError)
READERS, register = make_registry()
_SET_NAME_RE = re.compile(r"([A-Za-z0-9_.-]+)=(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Fields:
    """Record field names (`data.fields.*`) read for each output key. `problem` and `answer` are
    required in every record; the others are optional: a record without one (or with null) gets ""
    for solution, `default_verifier`, the set name or file stem as family, 0 as difficulty, and ""
    here means never read it."""

    problem: str = "problem"
    answer: str = "answer"
    solution: str = "solution"
    verifier: str = "verifier"
    family: str = "family"
    difficulty: str = "difficulty"


class Source:
    """Checked records of one or more files, random access. `skipped` counts bad records dropped
    under `skip_bad_records`, `first_skip` says why the first one was; `files` are the labels read."""

    def __init__(self, records: list[dict], skipped: int = 0, first_skip: str = "", files: tuple[str, ...] = ()):
        self.records, self.skipped, self.first_skip, self.files = records, skipped, first_skip, files

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[index])  # a copy: a transform that edits its input cannot corrupt the source

    def __repr__(self) -> str:
        return f"Source({len(self)} records from {len(self.files)} files, {self.skipped} skipped)"


def parse_spec(spec: str) -> list[tuple[str, list[str]]]:
    """`'a=x.jsonl,y/*.jsonl;b=z.jsonl'` -> [('a', ['x.jsonl', 'y/*.jsonl']), ('b', ['z.jsonl'])];
    an unnamed set has name ''."""
    sets = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SET_NAME_RE.fullmatch(part)
        name, rest = (m.group(1), m.group(2)) if m else ("", part)
        patterns = [p.strip() for p in rest.split(",") if p.strip()]
        if not patterns:
            raise ValueError(f"data spec {spec!r}: set {name or part!r} names no files")
        sets.append((name, patterns))
    if not sets:
        raise ValueError("data spec is empty: give paths or globs, e.g. 'train.jsonl' or 'a=x.jsonl;b=y.jsonl'")
    return sets


def open_sets(reader: str, spec: str, *, fields: Fields = Fields(), skip_bad_records: bool = False,
              default_verifier: str = "math", data_dir: str = "", default_name: str = "eval") -> dict[str, Source]:
    """One source per set of `spec` (see the module docstring), keyed by set name; a spec of one
    unnamed set is keyed `default_name`."""
    if reader not in READERS:
        raise ValueError(f"config field 'data.source' = {reader!r}: allowed values are {sorted(READERS)}")
    if default_verifier not in VERIFIERS:
        raise ValueError(f"config field 'data.verifier' = {default_verifier!r}: allowed values are {sorted(VERIFIERS)}")
    sets = parse_spec(spec)
    names = [name or default_name for name, _ in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"data spec {spec!r}: set names must be unique (got {names}); name each set as name=glob")
    return {key: _open(reader, name, patterns, fields, skip_bad_records, default_verifier, data_dir)
            for key, (name, patterns) in zip(names, sets)}


def open_source(reader: str, spec: str, **kwargs) -> Source:
    """All sets of `spec` as one source, in spec order (e.g. for training); kwargs as `open_sets`."""
    parts = list(open_sets(reader, spec, **kwargs).values())
    return Source([r for p in parts for r in p.records], sum(p.skipped for p in parts),
                  next((p.first_skip for p in parts if p.first_skip), ""), tuple(f for p in parts for f in p.files))


def _open(reader: str, name: str, patterns: list[str], fields: Fields, skip_bad_records: bool,
          default_verifier: str, data_dir: str) -> Source:
    records, skipped, first_skip, files = [], 0, "", []
    for pattern in patterns:
        for label, family, rows in READERS[reader](pattern, data_dir):
            if label in files:
                continue
            files.append(label)
            for where, raw in rows:
                try:
                    if isinstance(raw, ValueError):
                        raise raw
                    records.append(make_record(raw, fields, name or family, default_verifier))
                except ValueError as e:
                    msg = f"{label}: {where}: {e}"
                    if not skip_bad_records:
                        raise ValueError(msg + " (data.skip_bad_records=True drops such records)") from None
                    skipped, first_skip = skipped + 1, first_skip or msg
    if not records:
        raise ValueError(f"no usable records in {patterns} ({skipped} bad)"
                         + (f"; first: {first_skip}" if skipped else ""))
    return Source(records, skipped, first_skip, tuple(files))


# ---------------------------------------------------------------- record checks


def make_record(raw: Mapping, fields: Fields, family: str, default_verifier: str = "math") -> dict:
    """One raw record -> the task-record dict (module docstring); ValueError naming the field if bad.
    A verifier name must be registered in this process (import verifier plugin modules first)."""
    problem = _text(raw, "problem", fields.problem)
    if problem is None or not problem.strip():
        raise ValueError(f"field 'problem' ({fields.problem!r}): {'empty' if problem is not None else 'missing'}")
    answer = _answer(raw, fields.answer)
    verifier = _text(raw, "verifier", fields.verifier) or default_verifier
    if verifier not in VERIFIERS:
        raise ValueError(f"field 'verifier' ({fields.verifier!r}): {verifier!r} is not one of {sorted(VERIFIERS)}")
    difficulty = _get(raw, fields.difficulty)
    if difficulty is not None and (not isinstance(difficulty, numbers.Integral)
                                   or isinstance(difficulty, (bool, np.bool_))):
        raise ValueError(f"field 'difficulty' ({fields.difficulty!r}): expected an integer, got {difficulty!r}")
    return {"problem": problem, "answer": answer, "solution": _text(raw, "solution", fields.solution) or "",
            "verifier": verifier, "family": _text(raw, "family", fields.family) or family,
            "difficulty": int(difficulty or 0)}


def _get(raw: Mapping, name: str):
    """The value of field `name`, None if unmapped, absent or null; bytes (TFDS, Parquet binary) as str."""
    value = raw.get(name) if name else None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _text(raw: Mapping, key: str, name: str) -> str | None:
    value = _get(raw, name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"field {key!r} ({name!r}): expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def _answer(raw: Mapping, name: str) -> str:
    """A non-empty string, or a finite int / float written out (0.1 -> '0.1', 3.0 -> '3', 1e-7 ->
    '0.0000001': positional, since a verifier may read the `e` of `1e-07` as Euler's number)."""
    value = _get(raw, name)
    if value is None:
        raise ValueError(f"field 'answer' ({name!r}): missing")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"field 'answer' ({name!r}): expected a string or number, got bool {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"field 'answer' ({name!r}): not a finite number: {value!r}")
        return np.format_float_positional(float(value), trim="-")
    if not isinstance(value, str):
        raise ValueError(f"field 'answer' ({name!r}): expected a string or number, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field 'answer' ({name!r}): empty")
    return value.strip()


# ---------------------------------------------------------------- readers


def _files(pattern: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"no file matches {pattern!r}")
    return paths


def _stem(path: str) -> str:
    return os.path.basename(path).split(".")[0]


@register("jsonl")
def read_jsonl(pattern: str, data_dir: str = "") -> Iterator[tuple[str, str, Iterator]]:
    """One JSON object per line; blank lines are ignored, lines are counted from 1."""
    for path in _files(pattern):
        yield path, _stem(path), _jsonl_rows(path)


def _jsonl_rows(path: str) -> Iterator[tuple[str, Mapping | ValueError]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, (dict, ValueError)):
                obj = ValueError(f"expected a JSON object, got {type(obj).__name__}")
            yield f"line {n}", obj


@register("parquet")
def read_parquet(pattern: str, data_dir: str = "") -> Iterator[tuple[str, str, Iterator]]:
    """Rows of Parquet files (pyarrow), counted from 0. Every column is read: files of problem sets
    are small, and a mapped name that is not a column then reads as a missing field per row."""
    import pyarrow.parquet as pq

    for path in _files(pattern):
        rows = pq.read_table(path).to_pylist()
        yield path, _stem(path), ((f"row {i} (0-based)", r) for i, r in enumerate(rows))


@register("tfds")
def read_tfds(pattern: str, data_dir: str = "") -> Iterator[tuple[str, str, Iterator]]:
    """A prepared TFDS dataset `name[/config][:version]@split` in `data_dir` (array_record format)."""
    import tensorflow_datasets as tfds

    name, sep, split = pattern.rpartition("@")
    if not sep or not name or not split:
        raise ValueError(f"TFDS pattern {pattern!r}: expected name[/config][:version]@split, e.g. gsm8k@test")
    ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    yield pattern, re.split(r"[/:]", name)[0], ((f"record {i} (0-based)", ds[i]) for i in range(len(ds)))
