"""The real-model path learns: SFT on the built-in tasks, export to a Hugging Face directory, export the
tasks to JSONL, then TP-Schedule RL from `model.init_from` on the JSONL files raises eval accuracy.

Every stage is the command a user runs (`tsched.main`, `tsched.data.tasks --export`); the second run
sees the model only through the exported directory and the problems only through the files.

Measured (shared 2-core CPU at load ~11, 6 min in all): avg@4 on 100 held-out gcd problems 0.250 ->
0.298 after 40 RL steps, greedy 0.35 -> 0.28; with gcd,sort and 150 SFT steps avg@4 0.052 -> 0.068,
greedy 0.13 -> 0.10. The avg@4 gain (what RL maximises) is about 1.5 standard errors at this budget:
the assertion can fail on an unlucky machine; greedy accuracy is not asserted (it fell in both runs)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

DATA = {"families": "gcd", "train-size": 2000, "eval-size": 100, "seed": 0, "min-difficulty": 1,
        "max-difficulty": 2}
COMMON = {"data.max_difficulty": DATA["max-difficulty"], "data.prompt_len": 20, "data.max_solution_tokens": 48,
          "rl.max_new_tokens": 48, "rl.prompts_per_step": 8, "rl.group_size": 8, "eval.num_problems": 100,
          "eval.batch_size": 100, "eval.samples": 4, "verify.num_workers": 1, "train.progress": False,
          "train.log_every": 10, "train.kl_metrics": False, "train.checkpoint_every": 100}


def main(**overrides):
    cmd = [sys.executable, "-m", "tsched.main", "--config=configs/default.py",
           *(f"--config.{k}={v}" for k, v in {**COMMON, **overrides}.items())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.load(open(out.stdout.strip().splitlines()[-1]))


def test_sft_export_then_rl_from_the_export_on_jsonl_raises_accuracy(tmp_path):
    # ---- SFT on the built-in tasks (one RL step at a negligible rate: the run's job is the export)
    main(**{"run_dir": tmp_path / "sft", "data.data_dir": tmp_path / "data", "data.families": DATA["families"],
            "data.train_size": DATA["train-size"], "data.eval_size": DATA["eval-size"], "sft.steps": 200,
            "sft.batch_size": 32,
            "rl.steps": 1, "rl.lr": 1e-12, "rl.schedule.mode": "constant", "train.export_hf": True})
    hf = tmp_path / "sft" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json"} <= set(os.listdir(hf))

    # ---- the same problems as JSONL files
    subprocess.run([sys.executable, "-m", "tsched.data.tasks", "--export", str(tmp_path / "jsonl"),
                    *(a for k, v in DATA.items() for a in (f"--{k}", str(v)))], cwd=ROOT, check=True,
                   capture_output=True)

    # ---- TP-Schedule RL from the exported checkpoint on the files
    s = main(**{"run_dir": tmp_path / "rl", "data.data_dir": tmp_path / "data", "model.init_from": hf,
                "tokenizer.model_path": hf / "tokenizer.model", "data.source": "jsonl",
                "data.train_files": tmp_path / "jsonl" / "train.jsonl",
                "data.eval_files": tmp_path / "jsonl" / "eval.jsonl", "rl.steps": 40,
                "rl.credit.strategy": "tp", "rl.schedule.mode": "linear"})
    print(f"avg@4 {s['eval_accuracy_before_rl']:.3f} -> {s['eval_accuracy_after_rl']:.3f}, greedy "
          f"{s['eval_greedy_accuracy_before_rl']:.3f} -> {s['eval_greedy_accuracy_after_rl']:.3f}, "
          f"{s['wall_time_s']:.0f} s")
    assert s["init_from"] == str(hf) and s["data_source"] == "jsonl"
    assert s["eval_accuracy_after_rl"] > s["eval_accuracy_before_rl"]
