"""A malformed config fails before any work, with a message naming the field."""

import os
import subprocess
import sys

import pytest

from tests.tiny import set_field
from tsched.config import base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*overrides, tmp_path):
    cmd = [sys.executable, "-m", "tsched.main", "--config=configs/default.py",
           f"--config.run_dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override,needle", [
    ("--config.rl.no_such_field=1", "no_such_field"),
    ("--config.rl.steps=many", "rl.steps"),
    ("--config.rl.credit.strategy=psychic", "rl.credit.strategy"),
    ("--config.rl.schedule.mode=wobbly", "rl.schedule.mode"),
    ("--config.data.families=arith,poetry", "data.families"),
])
def test_bad_config_fails_fast_naming_the_field(override, needle, tmp_path):
    proc = run_main(override, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("field,value,needle", [
    ("rl.credit.strategy", "psychic", "'uniform', 'tp', 'forking'"),
    ("rl.aggregation", "token-sum", "token-mean"),
    ("rl.group_size", 1, "rl.group_size"),
    ("rl.top_p", 0.0, "rl.top_p"),
    ("rl.micro_batches", 3, "rl.micro_batches"),
    ("model.n_heads", 3, "model.n_heads"),
    ("model.logits_chunk", -1, "model.logits_chunk"),
    ("model.attn_block", -8, "model.attn_block"),
    ("rl.schedule.max_ratio", 0.0, "max_ratio"),
])
def test_validate_names_field_and_allowed_values(field, value, needle):
    cfg = base_config()
    set_field(cfg, field, value)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        validate(cfg)


def test_default_config_is_valid_and_schedule_follows_rl_steps():
    cfg = base_config()
    validate(cfg)
    cfg.rl.steps = 123
    assert cfg.rl.schedule.total_steps == 123
