"""Validation of the data-source, template, checkpoint and evaluation fields: one ConfigError naming the
field, before anything is read or written (no checkpoint weights are needed: a config.json suffices)."""

import json

import pytest

from tsched import config
from tsched.config import ConfigError, base_config, validate

QWEN3_CONFIG = {"model_type": "qwen3", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
                "tie_word_embeddings": True}


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    (d / "tokenizer.json").write_text("{}")  # validation only checks it is there
    return d


def check(cfg, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        validate(cfg, num_devices=1)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_source_name_lists_the_registered_readers():
    c = base_config()
    c.data.source = "csv"
    msg = check(c, "data.source")
    assert all(name in msg for name in ("tasks", "jsonl", "parquet", "tfds"))


def test_file_source_needs_file_specs():
    c = base_config()
    c.data.source = "jsonl"
    check(c, "data.train_files")
    c.data.train_files = "train.jsonl"
    check(c, "data.eval_files")
    c.data.eval_files = "a=x.jsonl;b=y.jsonl"
    validate(c, num_devices=1)  # files are opened (and their records checked) by pipeline.open_splits


def test_template_must_be_a_name_or_contain_problem():
    c = base_config()
    c.data.template = "Question: {question}"
    msg = check(c, "data.template")
    assert "{problem}" in msg
    c.data.template = "Q: {problem}\nA:"
    validate(c, num_devices=1)
    c.data.template = "chat"  # the built-in tokenizer has no chat template
    check(c, "data.template")


def test_unknown_default_verifier():
    c = base_config()
    c.data.verifier = "vibes"
    check(c, "data.verifier")


def test_init_from_must_be_a_checkpoint_directory(tmp_path, ckpt_dir):
    c = base_config()
    c.model.init_from = str(tmp_path / "missing")
    assert "no such directory" in check(c, "model.init_from")
    c.model.init_from = str(tmp_path)  # exists, no config.json
    assert "config.json" in check(c, "model.init_from")
    c.model.init_from = str(ckpt_dir)
    validate(c, num_devices=1)
    assert config._vocab_size(c) == 320 and config.tokenizer_path(c) == str(ckpt_dir / "tokenizer.json")
    (ckpt_dir / "tokenizer.json").unlink()
    check(c, "model.init_from")


def test_preset_conflicting_with_init_from(ckpt_dir):
    c = base_config()
    c.model.init_from, c.model.preset = str(ckpt_dir), "qwen3-0.6b"
    assert "d_model" in check(c, "model.preset")


def test_sft_steps_default_follows_init_from(ckpt_dir):
    c = base_config()
    assert config.sft_steps(c) == 400
    c.model.init_from = str(ckpt_dir)
    assert config.sft_steps(c) == 0
    c.sft.steps = 7
    assert config.sft_steps(c) == 7
    c.sft.steps = -2
    check(c, "sft.steps")


def test_pass_k_and_eval_every():
    c = base_config()
    c.eval.samples = 4
    assert config.pass_ks(c) == [1, 4]
    c.eval.pass_k = "1,x"
    check(c, "eval.pass_k")
    c.eval.pass_k = "1"
    c.eval.every = -1
    check(c, "eval.every")


def test_qwen3_math_config_takes_the_checkpoint_and_files_from_flags(ckpt_dir):
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("qwen3_math", os.path.join(root, "configs", "qwen3_math.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    check(c, "data.train_files")
    c.data.train_files, c.data.eval_files = "train.jsonl", "math500=m.jsonl;gsm8k=g.jsonl"
    c.model.init_from = str(ckpt_dir)
    validate(c, num_devices=1)
    assert config.sft_steps(c) == 0 and (c.rl.lr, c.rl.group_size, c.rl.temperature) == (1e-6, 8, 1.2)
    assert (c.data.template, c.data.verifier, c.rl.credit.strategy, c.rl.schedule.mode) == ("boxed", "math", "tp",
                                                                                             "linear")
