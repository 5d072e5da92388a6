"""Every experiment config in configs/ runs a short training on the built-in tasks."""

import glob
import importlib.util
import json
import os

import pytest

from tests.tiny import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_ONLY = {"qwen3_4b_tpu"}  # a 4B model: checked by tests/test_plan.py, not trained here
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p)[:-3] not in PLAN_ONLY)
pytestmark = pytest.mark.slow


def load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_every_paper_config_exists():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {"default", "grpo", "tp_schedule", "forking", "forking_schedule", "entropy_adv",
            "entropy_adv_schedule", "off_policy_schedule", "gspo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_config_trains(path, tmp_path_factory):
    from tsched.train import trainer

    tmp = tmp_path_factory.getbasetemp() / "configs"
    cfg = tiny(load(path), tmp, os.path.basename(path)[:-3], rl__steps=3, sft__steps=4, eval__num_problems=20,
               train__kl_metrics=False)
    summary = json.load(open(trainer.run(cfg)))
    assert summary["strategy"] == cfg.rl.credit.strategy
    rows = [json.loads(ln) for ln in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 3 and all(r["loss"] == r["loss"] for r in rl)  # no NaN
    # 3 steps, decay over int(3 * 0.8) = 2 of them: r = m (1 - 1/2) at the first step
    assert rl[0]["magnitude"] == pytest.approx(cfg.rl.schedule.initial_magnitude * (0.5 if cfg.rl.schedule.mode == "linear" else 1))
