"""A malformed config fails before any work: one line naming the field, exit 2, the run directory untouched."""

import os
import subprocess
import sys

import pytest

from tests.tiny import set_field
from tsched import config
from tsched.config import ConfigError, base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*overrides, run_dir, config_file="configs/default.py"):
    cmd = [sys.executable, "-m", "tsched.main", f"--config={config_file}", f"--config.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override,needle", [
    ("--config.rl.no_such_field=1", "rl.no_such_field"),
    ("--config.rl.steps=many", "rl.steps"),
    ("--config.rl.credit.strategy=psychic", "rl.credit.strategy"),
    ("--config.data.families=arith,poetry", "data.families"),
    ("--config.model.preset=qwen9", "model.preset"),
    ("--config.mesh.fsdp=3", "mesh"),
    ("--config.rl.lr=-1", "rl.lr"),
    ("--config.rl.top_k=100000", "rl.top_k"),
])
def test_bad_config_is_one_line_exit_2_and_leaves_the_run_dir_alone(override, needle, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("an earlier run")
    proc = run_main(override, run_dir=run_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(run_dir) == ["keep.txt"] and os.listdir(tmp_path) == ["run"]  # nothing moved or written


def test_bad_argument_of_a_parameterised_config_is_one_line(tmp_path):
    proc = run_main(run_dir=tmp_path / "run", config_file="configs/paper.py:method=psychic")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "psychic" in proc.stderr and "tp_schedule" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("rl.credit.strategy", "psychic", "'uniform', 'tp', 'forking'"),
    ("rl.credit.strategy", "off_policy", "rl.credit.strategy"),  # a prompt transform now, not a criterion
    ("rl.prompt_transform", "prefix", "reference_prefix"),
    ("rl.aggregation", "token-sum", "token-mean"),
    ("rl.advantage", "ppo", "grpo"),
    ("rl.kl_estimator", "k2", "k3"),
    ("rl.credit.normalizer", "all", "valid_tokens"),
    ("rl.schedule.mode", "wobbly", "linear"),
    ("model.dtype", "float16", "bfloat16"),
    ("rl.cache_dtype", "float16", "auto"),
    ("model.preset", "qwen9", "qwen3-4b"),
    ("rl.group_size", 1, "rl.group_size"),
    ("rl.top_p", 0.0, "rl.top_p"),
    ("rl.top_p", 1.5, "rl.top_p"),
    ("rl.top_k", -1, "rl.top_k"),
    ("rl.top_k", 65, "rl.top_k"),
    ("rl.lr", 0.0, "rl.lr"),
    ("sft.lr", -1e-3, "sft.lr"),
    ("rl.max_grad_norm", 0.0, "rl.max_grad_norm"),
    ("rl.max_grad_norm", -1.0, "rl.max_grad_norm"),
    ("rl.credit.kappa", 0.0, "rl.credit.kappa"),
    ("rl.temperature", 0.0, "rl.temperature"),
    ("eval.temperature", -0.5, "eval.temperature"),
    ("rl.micro_batches", 3, "rl.micro_batches"),
    ("rl.micro_batches", -1, "rl.micro_batches"),
    ("sft.micro_batches", 3, "sft.micro_batches"),  # must divide sft.batch_size (64)
    ("sft.micro_batches", -1, "sft.micro_batches"),
    ("sft.length_buckets", 0, "sft.length_buckets"),
    ("sft.length_buckets", 9, "sft.length_buckets"),  # 2^8 > data.max_solution_tokens (112)
    ("rl.prompts_per_pass", 3, "rl.prompts_per_pass"),  # must divide rl.prompts_per_step (16)
    ("rl.prompts_per_pass", -1, "rl.prompts_per_pass"),
    ("rl.length_buckets", 0, "rl.length_buckets"),
    ("rl.length_buckets", 8, "rl.length_buckets"),  # max_new_tokens 64: the shortest bucket would be < 1 token
    ("model.n_heads", 3, "model.n_heads"),
    ("model.logits_chunk", -1, "model.logits_chunk"),
    ("model.attn_block", -8, "model.attn_block"),
    ("rl.schedule.max_ratio", 0.0, "max_ratio"),
    ("rl.schedule.sigmoid_k", 0.0, "sigmoid_k"),
    ("data.prompt_len", 0, "data.prompt_len"),
    ("data.solution_error_rate", 1.0, "data.solution_error_rate"),
    ("data.solution_error_rate", -0.1, "data.solution_error_rate"),
    ("mesh.tensor", 0, "mesh.tensor"),
    ("eval.num_problems", 501, "eval.num_problems"),
    ("tokenizer.model_path", "/no/such/tokenizer.model", "tokenizer.model_path"),
])
def test_validate_names_field_and_allowed_values(field, value, needle):
    cfg = base_config()
    set_field(cfg, field, value)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate(cfg, num_devices=1)


def test_mesh_is_checked_against_the_devices():
    cfg = base_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    validate(cfg, num_devices=8)
    with pytest.raises(ConfigError, match="mesh"):
        validate(cfg, num_devices=4)
    cfg.rl.prompts_per_step = 12  # batches split by rows over data x fsdp = 8 devices
    with pytest.raises(ConfigError, match=r"rl.prompts_per_step.*mesh.data x mesh.fsdp \(2 x 4\)"):
        validate(cfg, num_devices=8)


def test_allowed_names_are_the_registries():
    """A newly registered criterion is a valid config value with no other change."""
    from tsched.rl import credit

    cfg = base_config()
    cfg.rl.credit.strategy = "test_only_criterion"
    with pytest.raises(ConfigError):
        validate(cfg, num_devices=1)
    credit.register("test_only_criterion")(credit.CRITERIA["uniform"])
    try:
        validate(cfg, num_devices=1)
    finally:
        del credit.CRITERIA["test_only_criterion"]


def test_followers_follow_until_set_and_never_write_back():
    cfg = base_config()
    validate(cfg, num_devices=1)
    cfg.rl.steps, cfg.rl.temperature = 123, 1.2
    assert cfg.rl.schedule.total_steps == 123 and cfg.eval.temperature == 1.2
    cfg.rl.schedule.total_steps, cfg.eval.temperature = 50, 0.6
    assert cfg.rl.steps == 123 and cfg.rl.temperature == 1.2  # setting a follower leaves its source alone
    cfg.rl.temperature = 0.9
    assert cfg.eval.temperature == 0.6


def test_eval_samples_at_the_rl_temperature_unless_set():
    from tsched.eval import sampling_configs

    class Tok:
        eos_id, pad_id = 3, 0

    cfg = base_config()
    cfg.rl.temperature, cfg.rl.top_p = 1.2, 0.95
    sampled = sampling_configs(cfg, Tok())["sampled"]
    assert (sampled.temperature, sampled.top_p, sampled.num_samples) == (1.2, 0.95, cfg.eval.samples)
    assert sampling_configs(cfg, Tok())["greedy"].temperature == 0.0
    cfg.eval.temperature = 0.6
    assert sampling_configs(cfg, Tok())["sampled"].temperature == 0.6


def test_data_cache_is_outside_the_run_dir():
    cfg = base_config()
    cfg.run_dir = "runs/x"
    assert config.data_dir(cfg) == os.path.abspath("runs/.data")
    cfg.data.data_dir = "/data/cache"
    assert config.data_dir(cfg) == "/data/cache"


def fake_sft_run(path, cfg, steps):
    """A run directory as a finished SFT leaves it: config.json and the files of a complete checkpoint."""
    step = path / "ckpt" / "sft" / str(steps)
    (step / "state").mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    (step / "state" / "_METADATA").write_text("{}")
    (path / "config.json").write_text(cfg.to_json_best_effort())
    return str(path)


def test_warm_start_must_be_a_finished_sft_of_the_same_config(tmp_path):
    base = base_config()
    base.sft.steps = 30
    run = fake_sft_run(tmp_path / "base", base, 30)
    cfg = base_config()
    cfg.sft.steps, cfg.sft.warm_start = 30, run
    cfg.data.data_dir, cfg.rl.credit.strategy, cfg.rl.lr = "/elsewhere", "uniform", 3e-4  # not SFT's business
    validate(cfg, num_devices=1)
    for field, value, needle in [("model.d_model", 64, "model.d_model: 128 -> 64"), ("seed", 1, "seed: 0 -> 1"),
                                 ("data.families", "arith", "data.families"), ("sft.lr", 1e-3, "sft.lr"),
                                 ("tokenizer.vocab_size", 80, "tokenizer.vocab_size")]:
        bad = base_config()
        bad.sft.steps, bad.sft.warm_start = 30, run
        set_field(bad, field, value)
        with pytest.raises(ConfigError, match=r"'sft.warm_start'.*different config.*" + needle.replace(".", r"\.")):
            validate(bad, num_devices=1)
    cfg.sft.steps = 40  # its checkpoint is of 30 steps, the config asks for 40
    with pytest.raises(ConfigError, match=r"'sft.warm_start'.*no finished SFT checkpoint .*ckpt/sft/40"):
        validate(cfg, num_devices=1)
    cfg.sft.steps = 0
    with pytest.raises(ConfigError, match=r"'sft.warm_start'.*runs no SFT"):
        validate(cfg, num_devices=1)
    cfg.sft.steps, cfg.sft.warm_start = 30, str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"'sft.warm_start'.*config.json \(no such directory\)"):
        validate(cfg, num_devices=1)


def test_a_warm_starts_evaluation_is_reused_only_when_every_eval_field_agrees():
    from tsched.config import eval_differences

    saved = base_config()
    same = base_config()
    # The run's own method, budget and bookkeeping do not change what the SFT parameters evaluate to.
    for field, value in [("rl.credit.strategy", "uniform"), ("rl.lr", 3e-4), ("rl.steps", 7), ("eval.every", 40),
                         ("data.data_dir", "/elsewhere"), ("sft.warm_start", "/w"), ("train.log_every", 1),
                         ("eval.reuse_warm_start", False)]:
        set_field(same, field, value)
    assert eval_differences(same, saved.to_json_best_effort()) == []
    for field, value in [("seed", 3), ("eval.samples", 2), ("eval.num_problems", 100), ("rl.max_new_tokens", 64),
                         ("rl.top_k", 5), ("rl.cache_dtype", "bfloat16"),
                         ("verify.timeout_s", 1.0), ("mesh.fsdp", 2), ("model.d_model", 64),
                         ("data.families", "arith")]:
        other = base_config()
        set_field(other, field, value)
        assert [d.split(":")[0] for d in eval_differences(other, saved.to_json_best_effort())] == [field], field
    other = base_config()  # eval.temperature follows rl.temperature: both differ
    other.rl.temperature = 0.7
    assert [d.split(":")[0] for d in eval_differences(other, saved.to_json_best_effort())] == \
        ["eval.temperature", "rl.temperature"]


def test_a_field_added_after_a_run_was_written_counts_as_its_default():
    import json

    cfg = base_config()
    saved = json.loads(cfg.to_json_best_effort())
    del saved["rl"]["length_buckets"]  # a run dir written before the field existed
    assert config.config_differences(cfg, json.dumps(saved)) == []
    cfg.rl.length_buckets = 3
    assert config.config_differences(cfg, json.dumps(saved)) == ["rl.length_buckets: 1 -> 3"]
    # a field whose default changes what a run does counts as the behaviour before it: exact solutions
    cfg = base_config()
    saved = json.loads(cfg.to_json_best_effort())
    del saved["data"]["solution_error_rate"]
    assert config.config_differences(cfg, json.dumps(saved)) == ["data.solution_error_rate: 0.0 -> 0.06"]
