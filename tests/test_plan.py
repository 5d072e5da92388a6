"""tsched.plan compiles the RL update from abstract shapes and prints per-device memory."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # subprocesses that compile for several devices


def run_plan(*args):
    cmd = [sys.executable, "-m", "tsched.plan", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^([a-z +]+?)\s+([\d.]+)\s+[\d.]+$", proc.stdout, re.M)}


def test_plan_shards_parameters_and_optimizer_state():
    one = run_plan("--config=configs/default.py", "--simulate_devices=1", "--config.model.d_model=256",
                   "--config.model.ffn_dim=1024")
    four = run_plan("--config=configs/default.py", "--simulate_devices=4", "--config.mesh.data=1",
                    "--config.mesh.fsdp=4", "--config.model.d_model=256", "--config.model.ffn_dim=1024")
    for k in ("parameters", "optimizer state", "activations + workspace", "total"):
        assert k in one and k in four
    # Adam keeps two moments per parameter; FSDP over 4 devices divides both by 4
    assert four["optimizer state"] == pytest.approx(2 * four["parameters"], rel=0.02)
    assert four["parameters"] == pytest.approx(one["parameters"] / 4, rel=0.05)
    assert four["total"] >= four["parameters"] + four["optimizer state"]


def test_plan_for_qwen3_4b_on_a_simulated_v5e_8():
    m = run_plan("--config=configs/qwen3_4b_tpu.py", "--simulate_devices=8")
    assert m["parameters"] == pytest.approx(4.02e9 * 4 / 8 / 2**20, rel=0.01)  # MiB: float32 masters, FSDP 8
