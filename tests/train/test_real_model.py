"""RL from a Hugging Face checkpoint on user files, as a user runs it: `python -m tsched.main` from
`model.init_from` (tiny random Qwen3 and Llama checkpoints with a trained BPE tokenizer.json, a chat
template and two end ids) through the jsonl / parquet sources and the chat / boxed / custom templates,
then `python -m tsched.eval` (pass@k against the formula), and the exported HF directory reloaded by
transformers with the same logits."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import hf_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

SMALL = {"rl.steps": 2, "rl.prompts_per_step": 2, "rl.group_size": 2, "rl.max_new_tokens": 8,
         "data.prompt_len": 64, "data.max_solution_tokens": 24, "eval.num_problems": 4, "eval.batch_size": 4,
         "eval.samples": 4, "eval.pass_k": "1,2,4", "verify.num_workers": 1, "train.progress": False,
         "train.log_every": 1, "train.checkpoint_every": 2, "train.kl_metrics": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One Qwen3 and one Llama checkpoint, and the problem sets as JSONL and Parquet."""
    tmp = tmp_path_factory.mktemp("real")
    train, evals = hf_tiny.problems(64, 0), hf_tiny.problems(8, 1)
    return {"tmp": tmp, "qwen3": hf_tiny.checkpoint("qwen3", tmp / "qwen3"),
            "llama": hf_tiny.checkpoint("llama", tmp / "llama"),
            "train.jsonl": hf_tiny.write_jsonl(tmp / "train.jsonl", train),
            "eval.jsonl": hf_tiny.write_jsonl(tmp / "eval.jsonl", evals[:4]),
            "eval2.jsonl": hf_tiny.write_jsonl(tmp / "eval2.jsonl", evals[4:]),
            "train.parquet": hf_tiny.write_parquet(tmp / "train.parquet", train, {"problem": "question"}),
            "eval.parquet": hf_tiny.write_parquet(tmp / "eval.parquet", evals, {"problem": "question"})}


def run(module, *args, **overrides):
    cmd = [sys.executable, "-m", module, *args, *(f"--config.{k}={v}" for k, v in overrides.items())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()


def train(world, name, kind, **overrides):
    run_dir = str(world["tmp"] / name)
    lines = run("tsched.main", "--config=configs/default.py", **{
        **SMALL, "model.init_from": world[kind], "run_dir": run_dir, "data.data_dir": str(world["tmp"] / "data"),
        **overrides})
    return run_dir, json.load(open(lines[-1]))


def numpy_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_qwen3_jsonl_chat_eval_every_export_and_eval_cli(world):
    import jax
    import orbax.checkpoint as ocp
    import torch
    import transformers

    from tsched import model

    run_dir, summary = train(world, "qwen3_chat", "qwen3", **{
        "data.source": "jsonl", "data.train_files": world["train.jsonl"],
        "data.eval_files": f"a={world['eval.jsonl']};b={world['eval2.jsonl']}", "data.template": "chat",
        "eval.every": 1, "train.export_hf": True})
    assert summary["init_from"] == world["qwen3"] and summary["template"] == "chat"
    assert {"eval/a/greedy_accuracy", "eval/b/pass@4"} <= set(summary["eval_per_set_after_rl"])
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["phase"] == "sft"] == []  # no toy warm start from a checkpoint
    assert all("eval/a/avg@4" in r and "eval/b/truncated" in r for r in rows if r["phase"] == "rl")
    last = [r for r in rows if r["phase"] == "rl"][-1]  # the after-RL evaluation is the last step's
    assert summary["eval_per_set_after_rl"] == {k: v for k, v in last.items() if k.startswith("eval/")}

    # ---- the export: transformers loads it with the logits of the final RL parameters, stops on both ids
    hf_dir = os.path.join(run_dir, "hf")
    gen = json.load(open(os.path.join(hf_dir, "generation_config.json")))
    src = json.load(open(os.path.join(world["qwen3"], "generation_config.json")))
    assert gen["eos_token_id"] == src["eos_token_id"] and len(gen["eos_token_id"]) == 2
    state = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(run_dir), "ckpt", "rl", "2", "state"))
    cfg, _ = model.load_pretrained(hf_dir)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    want = np.asarray(model.forward(cfg, jax.tree.map(jax.numpy.asarray, state["params"]), jax.numpy.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(tokens)).logits.numpy()
    assert np.max(np.abs(got - want)) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.decode(hf_tok("What is 2+3?")["input_ids"]) == "What is 2+3?"
    assert "<|im_start|>assistant" in hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                 add_generation_prompt=True)

    # ---- python -m tsched.eval on the run directory: per set, pass@k from the per-problem counts
    out = str(world["tmp"] / "eval_qwen3")
    lines = run("tsched.eval", "--config=configs/default.py", f"--checkpoint={run_dir}", f"--out={out}", **{
        **SMALL, "model.init_from": world["qwen3"], "data.source": "jsonl", "data.train_files": world["train.jsonl"],
        "data.eval_files": f"a={world['eval.jsonl']};b={world['eval2.jsonl']}", "data.template": "chat",
        "run_dir": run_dir, "data.data_dir": str(world["tmp"] / "data")})
    assert lines[-1] == os.path.join(out, "eval.json")
    report = json.load(open(lines[-1]))
    assert "rl step 2" in report["checkpoint"] and set(report["sets"]) == {"a", "b"}
    for r in report["sets"].values():
        s = r["sampled"]
        assert s["problems"] == 4 and len(s["correct_counts"]) == 4 and r["greedy"]["samples_per_problem"] == 1
        for k in (1, 2, 4):
            want = np.mean([numpy_pass_at_k(4, c, k) for c in s["correct_counts"]])
            assert s["pass_at_k"][str(k)] == pytest.approx(want, abs=1e-12)
        assert s["pass_at_k"]["1"] == pytest.approx(s["accuracy"])  # pass@1 is avg@k
        assert 0 < s["mean_length"] <= 8 and 0 <= s["truncated"] <= 1
    assert "| a | 4 |" in open(os.path.join(out, "eval.md")).read()


def test_llama_parquet_boxed_with_field_mapping(world):
    run_dir, summary = train(world, "llama_boxed", "llama", **{
        "data.source": "parquet", "data.train_files": world["train.parquet"], "data.eval_files": world["eval.parquet"],
        "data.fields.problem": "question", "data.template": "boxed", "rl.prompt_transform": "reference_prefix"})
    assert summary["eval_problems"] == 4 and summary["template"] == "boxed"
    rl = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rl if r["phase"] == "rl"] == [1, 2]


def test_llama_jsonl_custom_template_and_eval_of_an_hf_directory(world):
    custom = "Q: {problem} A:"
    run_dir, summary = train(world, "llama_custom", "llama", **{
        "data.source": "jsonl", "data.train_files": world["train.jsonl"], "data.eval_files": world["eval.jsonl"],
        "data.template": custom, "sft.steps": 2, "sft.batch_size": 4, "sft.warmup_steps": 1})
    assert summary["template"] == custom
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["phase"] == "sft"] == [1, 2]  # sft.steps set explicitly: it runs
    # the checkpoint itself, evaluated with the plain template
    lines = run("tsched.eval", "--config=configs/default.py", f"--checkpoint={world['llama']}",
                f"--out={world['tmp'] / 'eval_llama'}", **{
                    **SMALL, "data.source": "jsonl", "data.train_files": world["train.jsonl"],
                    "data.eval_files": world["eval.jsonl"], "data.template": "plain",
                    "run_dir": run_dir, "data.data_dir": str(world["tmp"] / "data")})
    report = json.load(open(lines[-1]))
    assert report["checkpoint"].startswith("Hugging Face checkpoint") and report["template"] == "plain"
