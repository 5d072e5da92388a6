"""`pipeline.open_splits` on file sources: train and named eval sets, the rendered prompt is what Encode
tokenizes and what the budget check counts, bad files and missing solutions are config errors."""

import json

import pytest

from tests import hf_tiny
from tsched.config import ConfigError, base_config
from tsched.data import pipeline
from tsched.data.tokenizer import train_tokenizer


@pytest.fixture
def cfg(tmp_path):
    c = base_config()
    c.run_dir = str(tmp_path / "run")
    c.data.source = "jsonl"
    c.data.train_files = hf_tiny.write_jsonl(tmp_path / "train.jsonl", hf_tiny.problems(30, 0))
    rows = hf_tiny.problems(6, 1)
    hf_tiny.write_jsonl(tmp_path / "e1.jsonl", rows[:2])
    hf_tiny.write_jsonl(tmp_path / "e2.jsonl", [{k: v for k, v in r.items() if k != "solution"} for r in rows[2:]])
    c.data.eval_files = f"one={tmp_path / 'e1.jsonl'};two={tmp_path / 'e2.jsonl'}"
    return c


def test_train_and_named_eval_sets(cfg):
    splits = pipeline.open_splits(cfg)
    assert len(splits["train"]) == 30 and list(splits["eval_sets"]) == ["one", "two"]
    assert [len(s) for s in splits["eval_sets"].values()] == [2, 4] and len(splits["eval"]) == 6
    assert splits["eval_sets"]["two"][0]["family"] == "two" and splits["eval_sets"]["two"][0]["verifier"] == "math"
    assert pipeline.tokenizer_cache_path(cfg).endswith("_v64.model")


def test_templates_render_before_tokenizing_and_count_in_the_budget(cfg, tmp_path):
    splits = pipeline.open_splits(cfg)
    tok = train_tokenizer(pipeline.corpus(splits["train"], lambda p: f"Q: {p} A:"), str(tmp_path / "t.model"), 64)
    problem = splits["train"][0]["problem"]
    for template, text in (("plain", problem), ("Q: {problem} A:", f"Q: {problem} A:")):
        cfg.data.template = template
        enc = pipeline.encoder(cfg, tok)
        out = enc.map(splits["train"][0])
        assert list(out["prompt"][-out["prompt_len"]:]) == tok.encode(text)
    n = len(tok.encode(f"Q: {problem} A:"))
    longest = pipeline.check_budgets([splits["train"]], tok, 64, 64, enc)["max_prompt_tokens"]
    assert longest >= n
    with pytest.raises(ConfigError, match="data.prompt_len"):
        pipeline.check_budgets([splits["train"]], tok, longest - 1, 64, enc)


def test_bad_files_and_missing_solutions_are_config_errors(cfg, tmp_path):
    cfg.sft.steps = 0
    pipeline.check_solutions(cfg, pipeline.open_splits(cfg)["eval_sets"]["two"])  # nothing needs solutions
    cfg.rl.prompt_transform = "reference_prefix"
    with pytest.raises(ConfigError, match="data.fields.solution.*reference_prefix"):
        pipeline.check_solutions(cfg, pipeline.open_splits(cfg)["eval_sets"]["two"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": "x"}) + "\n")
    cfg.data.train_files = str(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="data.train_files.*line 1.*answer"):
        pipeline.open_splits(cfg)
    cfg.data.train_files = str(tmp_path / "nothing*.jsonl")
    with pytest.raises(ConfigError, match="data.train_files.*no file matches"):
        pipeline.open_splits(cfg)


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    from tsched.data import tfds_builder

    tc = tfds_builder.task_config("arith,sort", 1, 2, 40, 8, 0)
    tfds_builder.build(tc, str(tmp_path / "tfds"))
    c = base_config()
    c.run_dir, c.data.source, c.data.data_dir = str(tmp_path / "run"), "tfds", str(tmp_path / "tfds")
    c.data.train_files, c.data.eval_files = f"tsched_tasks/{tc.name}@train", f"held_out=tsched_tasks/{tc.name}@eval"
    splits = pipeline.open_splits(c)
    assert len(splits["train"]) == 40 and list(splits["eval_sets"]) == ["held_out"] and len(splits["eval"]) == 8
    assert splits["train"][0]["verifier"] in ("numeric", "exact") and splits["train"][0]["solution"]


def test_slipped_task_solutions_are_their_own_dataset(tmp_path):
    """data.solution_error_rate builds a dataset of its own (rate 0 keeps the name and files written before
    slips existed), with the same problems and answers and slipped solutions."""
    c = base_config()
    c.run_dir, c.data.data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    c.data.families, c.data.train_size, c.data.eval_size = "chain", 60, 8
    c.data.solution_error_rate = 0.0
    assert pipeline._task_config(c).name == "chain_d1-3_n60-8_s0"
    clean = pipeline.open_splits(c)
    c.data.solution_error_rate = 0.3
    assert pipeline._task_config(c).name == "chain_d1-3_n60-8_s0_e0.3"
    slipped = pipeline.open_splits(c)
    pairs = [(clean["train"][i], slipped["train"][i]) for i in range(60)]
    assert all(a["problem"] == b["problem"] and a["answer"] == b["answer"] for a, b in pairs)
    assert sum(a["solution"] != b["solution"] for a, b in pairs) > 20
