"""The benchmarks run (smoke mode: tiny shapes, 2 steps); their FLOP accounting and throughput columns
are checked against independent arithmetic. No timing asserts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # subprocesses that compile the sampler and the update twice


def run(*args):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def forward_flops(ctx, L=1, D=32, H=2, K=1, Dh=16, F=64, V=64):
    """Smoke shape: matmul weights (q, k, v, o, gate, up, down) x 2, the unembedding, and attention over ctx keys."""
    return 2 * L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F) + 2 * D * V + 4 * L * H * Dh * ctx


def test_rl_bench_smoke_accounts_flops_and_tokens_beside_hf_and_trl(tmp_path):
    out = run("tsched.bench", "--smoke", "--external", "--json", str(tmp_path / "bench.json"))
    data = json.load(open(tmp_path / "bench.json"))
    B, G, P, T = 2, 2, 8, 8  # the smoke shape
    # the B prompts once, then every row's tokens at their context: the sampler's work and the update's forward
    fwd = B * sum(forward_flops(c + 1) for c in range(P)) + B * G * sum(forward_flops(P + t + 1) for t in range(T))
    want = {"sample": fwd, "score": fwd, "loss": 3 * fwd, "rl_step": 4 * fwd}
    assert [r["dtype"] for r in data["results"]] == ["float32", "bfloat16"]
    assert "varied / forced" not in out and not any("rl_step_vs_forced" in r for r in data["results"])
    for r in data["results"]:
        phases = r["phases"]
        assert set(phases) == {"sample", "score", "verify", "loss", "optimizer", "rl_step"}
        for name, flops in want.items():
            assert phases[name]["gflop"] == pytest.approx(flops / 1e9, rel=1e-9), name
            assert phases[name]["gflops"] == pytest.approx(flops / 1e9 / phases[name]["median_s"], rel=1e-9)
        assert r["sample_tokens_per_s"] == pytest.approx(B * G * T / phases["sample"]["median_s"])
        assert all(p["median_s"] > 0 for p in phases.values())
        # every table row printed is the JSON's
        for name, p in phases.items():
            assert any(line.split()[:2] == [r["dtype"], name] and f"{p['median_s']:.3f}" in line
                       for line in out.splitlines()), name
    # --external: HF generate and TRL's GRPO step at the same shape, in their own process
    ours, ext = data["results"][0], data["external"]
    assert ext["params"] == ours["params"]  # the shape flags reached it: the same model size in PyTorch
    assert ext["generate_s"] > 0 and ext["grpo_step_s"] > 0
    assert ext["generate_tokens_per_s"] == pytest.approx(B * G * T / ext["generate_s"])
    assert ext["sample_vs_generate"] == pytest.approx(ours["sample_tokens_per_s"] / ext["generate_tokens_per_s"])
    assert ext["rl_step_vs_grpo_step"] == pytest.approx(ours["rl_step_s"] / ext["grpo_step_s"])
    assert f"tsched / TRL {ext['rl_step_vs_grpo_step']:.2f}" in out


def test_loss_and_verify_bench_smoke():
    out = run("tsched.bench.loss", "--seqs", "4", "--tokens", "16", "--vocab", "32", "--micro", "2", "--repeats", "1")
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert {"uniform", "tp", "forking", "entropy_adv"} <= set(rows)
    out = run("tsched.bench.verify", "--items", "40", "--workers", "1")
    assert "items/s" in out


def test_rl_bench_varied_lengths_counts_useful_work(tmp_path):
    out = run("tsched.bench", "--smoke", "--lengths=varied", "--dtypes", "float32", "--json", str(tmp_path / "b.json"))
    data = json.load(open(tmp_path / "b.json"))
    B, G, P, T = 2, 2, 8, 8
    # the documented draw: lognormal(mu = ln(T / 4) - 1/2, sigma 1), rounded up, clipped to [1, T], seed 0
    lens = np.clip(np.ceil(np.random.default_rng(0).lognormal(np.log(T / 4) - 0.5, 1.0, B * G)), 1, T).astype(int)
    forced, varied = data["results"]
    assert (forced["lengths"], varied["lengths"]) == ("forced", "varied")
    assert varied["mean_length"] == pytest.approx(lens.mean()) and lens.max() < T
    # the decode step's cost per batch size: at the smoke shape only the full batch (fewer rows than MIN_BUCKET)
    assert forced["decode_step_s"] is None and list(varied["decode_step_s"]) == [str(B * G)]
    assert f"decode step by batch rows: {B * G} rows" in out
    fwd = B * sum(forward_flops(c + 1) for c in range(P)) + sum(forward_flops(P + t + 1) for L in lens for t in range(L))
    phases = varied["phases"]
    for name, flops in {"sample": fwd, "score": fwd, "loss": 3 * fwd, "rl_step": 4 * fwd}.items():
        assert phases[name]["gflop"] == pytest.approx(flops / 1e9, rel=1e-9), name
    for name, tokens in {"sample": lens.sum(), "score": B * P + lens.sum(), "rl_step": lens.sum()}.items():
        assert phases[name]["tokens_per_s"] == pytest.approx(tokens / phases[name]["median_s"]), name
    assert forced["sample_tokens_per_s"] == pytest.approx(B * G * T / forced["phases"]["sample"]["median_s"])
    ratio = varied["rl_step_s"] / forced["rl_step_s"]
    assert varied["rl_step_vs_forced"] == pytest.approx(ratio)
    assert f"float32: varied / forced time: rl_step {ratio:.2f}" in out


def test_decode_step_cost_recovers_the_cost_per_step_of_each_batch():
    """decode_step_cost inverts whole-call times into per-step costs: fed the times of a simulated sampler
    (the prefill, then chunks of DECODE_CHUNK steps, after each chunk the running rows compacted to the
    next power of two >= MIN_BUCKET, a step at n rows costing fixed + per_row * n), it returns those costs."""
    from tsched.bench.__main__ import decode_step_cost
    from tsched.sampling.sampler import DECODE_CHUNK, MIN_BUCKET

    N, T, prefill, fixed, per_row = 64, 128, 0.03, 2e-3, 1e-4

    def simulated(caps):  # seconds of one sampler call
        caps, n, total = np.asarray(caps), N, prefill
        for i in range(T):
            if not (caps > i).any():
                break
            total += fixed + per_row * n  # step i decodes the batch's n rows
            running = int((caps > i + 1).sum())
            if (i + 1) % DECODE_CHUNK == 0 and running:  # the host's check between chunks
                n = min(n, max(MIN_BUCKET, 1 << (running - 1).bit_length()))
        return total

    cost = decode_step_cost(simulated, N, T)
    assert sorted(cost) == [8, 16, 32, 64]
    for n, c in cost.items():
        assert c == pytest.approx(fixed + per_row * n, rel=1e-9), n
