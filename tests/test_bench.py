"""The benchmarks run (smoke mode: tiny shapes, 2 steps) and write well-formed output. No timing asserts."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_rl_bench_smoke_writes_json(tmp_path):
    out = run("tsched.bench", "--smoke", "--json", str(tmp_path / "bench.json"))
    data = json.load(open(tmp_path / "bench.json"))
    assert [r["dtype"] for r in data["results"]] == ["float32", "bfloat16"]
    for r in data["results"]:
        assert r["sample_tokens_per_s"] > 0 and r["rl_step_s"] > 0
        assert set(r["phases"]) == {"sample", "score", "verify", "loss", "optimizer", "rl_step"}
    assert "rl_step" in out


def test_loss_and_verify_bench_smoke():
    out = run("tsched.bench.loss", "--seqs", "4", "--tokens", "16", "--vocab", "32", "--micro", "2", "--repeats", "1")
    assert all(s in out for s in ("uniform", "tp", "forking", "entropy_adv"))
    out = run("tsched.bench.verify", "--items", "40", "--workers", "1")
    assert "items/s" in out
