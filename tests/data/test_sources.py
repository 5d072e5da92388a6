"""User problem sets (JSONL, Parquet, TFDS) as sources: records, field mapping, bad records, specs."""

import json
import subprocess
import sys

import grain
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tsched.data import pipeline, sources, tfds_builder
from tsched.data.tokenizer import train_tokenizer

KEYS = {"problem", "answer", "solution", "verifier", "family", "difficulty"}


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_jsonl_records_have_the_task_keys_and_types(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"problem": "p3", "answer": "x"}])
    write_jsonl(tmp_path / "a.jsonl", [
        {"problem": "p1", "answer": 7, "solution": "s1", "verifier": "numeric", "difficulty": 2},
        "",  # blank lines are not records
        {"problem": "p2", "answer": 0.5, "extra": [1, 2]},
    ])
    src = sources.open_source("jsonl", str(tmp_path / "*.jsonl"))
    assert len(src) == 3 and src.skipped == 0
    assert src.files == (str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))  # sorted after the glob
    assert src[0] == {"problem": "p1", "answer": "7", "solution": "s1", "verifier": "numeric", "family": "a",
                      "difficulty": 2}
    assert src[1] == {"problem": "p2", "answer": "0.5", "solution": "", "verifier": "math", "family": "a",
                      "difficulty": 0}
    assert src[2]["family"] == "b"
    for i in range(3):
        assert set(src[i]) == KEYS
        assert all(isinstance(src[i][k], str) for k in KEYS - {"difficulty"}) and type(src[i]["difficulty"]) is int
    src[0]["answer"] = "changed"
    assert src[0]["answer"] == "7"  # records are handed out as copies


@pytest.mark.parametrize("value,want", [(3, "3"), (-12, "-12"), (0.1, "0.1"), (3.0, "3"), (1e-7, "0.0000001"),
                                        (2.5e20, "250000000000000000000"), ("  42 ", "42")])
def test_numeric_answers_become_strings_the_verifiers_read(tmp_path, value, want):
    path = write_jsonl(tmp_path / "n.jsonl", [{"problem": "p", "answer": value}])
    assert sources.open_source("jsonl", path)[0]["answer"] == want


def test_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "final": "12", "rationale": "r", "kind": "numeric",
                                                 "solution": "not this one"}])
    fields = sources.Fields(problem="question", answer="final", solution="rationale", verifier="kind")
    assert sources.open_source("jsonl", path, fields=fields)[0] == {
        "problem": "q", "answer": "12", "solution": "r", "verifier": "numeric", "family": "gsm", "difficulty": 0}
    no_solution = sources.Fields(problem="question", answer="final", solution="")
    rec = sources.open_source("jsonl", path, fields=no_solution, default_verifier="exact")[0]
    assert rec["solution"] == "" and rec["verifier"] == "exact"


BAD_LINES = {
    "missing answer": ({"problem": "p"}, "'answer'.*missing"),
    "null answer": ({"problem": "p", "answer": None}, "'answer'.*missing"),
    "empty answer": ({"problem": "p", "answer": "  "}, "'answer'.*empty"),
    "list answer": ({"problem": "p", "answer": [1, 2]}, "'answer'.*string or number"),
    "bool answer": ({"problem": "p", "answer": True}, "'answer'.*bool"),
    "nan answer": ('{"problem": "p", "answer": NaN}', "'answer'.*finite"),
    "missing problem": ({"answer": "1"}, "'problem'.*missing"),
    "numeric problem": ({"problem": 5, "answer": "1"}, "'problem'.*string"),
    "numeric solution": ({"problem": "p", "answer": "1", "solution": 3}, "'solution'.*string"),
    "unknown verifier": ({"problem": "p", "answer": "1", "verifier": "nope"}, "'verifier'.*'nope'.*math"),
    "float difficulty": ({"problem": "p", "answer": "1", "difficulty": 1.5}, "'difficulty'.*integer"),
    "invalid json": ('{"problem": "p", "answer": ', "invalid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
}


@pytest.mark.parametrize("bad,match", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_record_names_file_line_and_field_or_is_skipped(tmp_path, bad, match):
    good = {"problem": "p", "answer": "1"}
    path = write_jsonl(tmp_path / "set.jsonl", [good, "", bad, good])  # the bad record is on line 3
    with pytest.raises(ValueError, match=f"set.jsonl: line 3: .*{match}"):
        sources.open_source("jsonl", path)
    src = sources.open_source("jsonl", path, skip_bad_records=True)
    assert len(src) == 2 and src.skipped == 1 and "line 3" in src.first_skip


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "p"}])
    with pytest.raises(ValueError, match="no usable records.*1 bad"):
        sources.open_source("jsonl", path, skip_bad_records=True)


def test_parquet_rows(tmp_path):
    table = pa.table({"question": ["q0", "q1", "q2"], "answer": [1.5, None, 3.0], "level": [1, 2, 3]})
    pq.write_table(table, tmp_path / "math.parquet")
    fields = sources.Fields(problem="question", difficulty="level")
    with pytest.raises(ValueError, match=r"math.parquet: row 1 \(0-based\): field 'answer'.*missing"):
        sources.open_source("parquet", str(tmp_path / "*.parquet"), fields=fields)
    src = sources.open_source("parquet", str(tmp_path / "math.parquet"), fields=fields, skip_bad_records=True)
    assert src.skipped == 1
    assert [src[i] for i in range(2)] == [
        {"problem": "q0", "answer": "1.5", "solution": "", "verifier": "math", "family": "math", "difficulty": 1},
        {"problem": "q2", "answer": "3", "solution": "", "verifier": "math", "family": "math", "difficulty": 3}]


def test_tfds_reader_matches_the_builder(tmp_path):
    config = tfds_builder.task_config("arith,sort", 1, 2, 20, 6, 0)
    builder = tfds_builder.build(config, str(tmp_path))
    want = [tfds_builder.decode(r) for r in builder.as_data_source()["eval"]]
    sets = sources.open_sets("tfds", f"tsched_tasks/{config.name}@eval", data_dir=str(tmp_path))
    assert list(sets) == ["eval"]
    assert [sets["eval"][i] for i in range(6)] == want
    with pytest.raises(ValueError, match="@split"):
        sources.open_source("tfds", "tsched_tasks", data_dir=str(tmp_path))
    # a process without the builder's code reads the prepared files alone, with TFDS split slicing
    code = ("import json, sys; from tsched.data import sources; "
            f"s = sources.open_source('tfds', 'tsched_tasks/{config.name}:1.0.0@eval[:4]', data_dir=sys.argv[1]); "
            "print(json.dumps([s[i] for i in range(len(s))]), 'tsched.data.tfds_builder' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    records, builder_imported = out.stdout.rsplit(" ", 1)
    assert json.loads(records) == [{k: int(v) if k == "difficulty" else v for k, v in r.items()} for r in want[:4]]
    assert builder_imported.strip() == "False"


def test_named_sets_and_spec_errors(tmp_path):
    for name in ("a1", "a2", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"problem": name, "answer": "1"}])
    spec = f"first={tmp_path}/a*.jsonl ; second={tmp_path}/b.jsonl,{tmp_path}/a1.jsonl"
    sets = sources.open_sets("jsonl", spec)
    assert list(sets) == ["first", "second"]
    assert [r["problem"] for r in sets["first"].records] == ["a1", "a2"]
    assert [r["problem"] for r in sets["second"].records] == ["b", "a1"]  # patterns in the given order
    assert {r["family"] for r in sets["second"].records} == {"second"}  # a set's name is its family
    both = sources.open_source("jsonl", spec)
    assert [r["problem"] for r in both.records] == ["a1", "a2", "b", "a1"]
    # a file named twice in one set is read once
    assert len(sources.open_source("jsonl", f"{tmp_path}/a1.jsonl,{tmp_path}/a*.jsonl")) == 2
    assert sources.parse_spec("x.jsonl, y.jsonl") == [("", ["x.jsonl", "y.jsonl"])]
    assert sources.parse_spec("dir/split=train/*.parquet") == [("", ["dir/split=train/*.parquet"])]
    with pytest.raises(ValueError, match="no file matches"):
        sources.open_source("jsonl", f"{tmp_path}/nothing*.jsonl")
    with pytest.raises(ValueError, match="unique"):
        sources.open_sets("jsonl", f"{tmp_path}/a1.jsonl;{tmp_path}/b.jsonl")
    with pytest.raises(ValueError, match="data.source.*jsonl"):
        sources.open_source("csv", f"{tmp_path}/a1.jsonl")
    with pytest.raises(ValueError, match="data.verifier.*math"):
        sources.open_source("jsonl", f"{tmp_path}/a1.jsonl", default_verifier="maths")
    with pytest.raises(ValueError, match="empty"):
        sources.parse_spec(" ; ")


def test_grain_pipeline_reads_a_source_like_the_builtin_splits(tmp_path):
    rows = [{"problem": f"Compute {i}+{i}.", "answer": 2 * i, "solution": f"{i}+{i}={2 * i}. Answer: {2 * i}"}
            for i in range(40)]
    src = sources.open_source("jsonl", write_jsonl(tmp_path / "d.jsonl", rows))
    assert pipeline.corpus(src)[:2] == ["Compute 0+0.", "0+0=0. Answer: 0"]
    tok = train_tokenizer(pipeline.corpus(src), str(tmp_path / "tok.model"), 48)
    enc = pipeline.Encode(tok.path, prompt_len=16, solution_len=24)
    rec = enc.map(src[3])
    assert rec["answer"] == "6" and rec["verifier"] == "math" and rec["family"] == "d"
    assert tok.decode(rec["prompt"][16 - rec["prompt_len"]:]) == "Compute 3+3."
    first = [next(iter(pipeline.train_batches(src, enc, 8, seed=5)))["answer"].tolist() for _ in range(2)]
    assert first[0] == first[1]  # a seeded shuffle of a source reproduces
    epoch = [r["answer"] for r in grain.MapDataset.source(src).shuffle(seed=1)]
    assert sorted(epoch) == sorted(str(2 * i) for i in range(40)) and epoch != [str(2 * i) for i in range(40)]
