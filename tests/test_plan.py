"""tsched.plan compiles the RL update and the sampler from abstract shapes and reports memory per device."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # subprocesses that compile for several devices


def run_plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "tsched.plan", *args, f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update, per device" in proc.stdout and "sampler, per device" in proc.stdout
    return json.loads(out.read_text())


SMALL = ("--config=configs/default.py", "--config.model.d_model=256", "--config.model.ffn_dim=1024")


def test_plan_shards_parameters_and_optimizer_state(tmp_path):
    one = run_plan(tmp_path, *SMALL, "--simulate_devices=1")["update_bytes_per_device"]
    four = run_plan(tmp_path, *SMALL, "--simulate_devices=4", "--config.mesh.data=1", "--config.mesh.fsdp=4")
    update = four["update_bytes_per_device"]
    # Adam keeps two moments per parameter; FSDP over 4 devices divides both by 4
    assert update["optimizer state"] == pytest.approx(2 * update["parameters"], rel=0.02)
    assert update["parameters"] == pytest.approx(one["parameters"] / 4, rel=0.05)
    assert update["total"] >= update["parameters"] + update["optimizer state"]
    assert four["sampler_bytes_per_device"]["total"] >= update["parameters"] + update["optimizer state"]


def test_plan_compiles_for_a_tpu_slice_through_libtpu(tmp_path):
    """v5e:2x4 through libtpu's ahead-of-time compiler (no TPU here): 8 TPU v5 lite devices with 16 GiB.
    The sampler's KV cache is one pass of prompts: rl.prompts_per_pass x group_size rows split over the 8
    chips, each with its prompt's cache (shared by the group) and its own at the full budget; the sampler
    splits the KV heads over the chips (8 here)."""
    cfg = ("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.rl.prompts_per_pass=8",
           "--config.model.n_heads=8", "--config.model.n_kv_heads=8")
    r = run_plan(tmp_path, *SMALL, "--topology=v5e:2x4", *cfg)
    assert "TPU v5 lite" in r["compiled_for"] and "libtpu" in r["compiled_for"]
    assert r["devices"] == 8 and r["hbm_per_device_gib"] == 16.0
    c = r["config"]
    m, G, T, P = c["model"], c["rl"]["group_size"], c["rl"]["max_new_tokens"], c["data"]["prompt_len"]
    per_token = 2 * m["n_layers"] * m["n_kv_heads"] * m["head_dim"] * 4  # k and v, float32 values
    cache = (8 * P + 8 * G * T) * per_token / 8  # 8 prompts' caches + their 64 rows' own caches, 1 head per chip
    sampler = r["sampler_bytes_per_device"]
    assert sampler["KV cache"] == pytest.approx(cache, rel=1e-6)
    assert sampler["parameters"] == pytest.approx(r["update_bytes_per_device"]["parameters"])
    assert sampler["total"] > sampler["parameters"] + sampler["optimizer state"] + sampler["KV cache"]
