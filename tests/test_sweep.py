"""tsched.sweep: grid expansion and naming (fast), and a real 2 x 2 sweep of tiny runs (slow)."""

import csv
import os
import subprocess
import sys

import pytest

from tests.tiny import TINY
from tsched import sweep as sweep_lib
from tsched.sweep import Run, check_configs, expand, main, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand_is_the_product_first_field_slowest():
    runs = expand(["rl.credit.strategy=uniform,tp", "seed=0,1,2"])
    assert [r.name for r in runs] == [
        "strategy=uniform,seed=0", "strategy=uniform,seed=1", "strategy=uniform,seed=2",
        "strategy=tp,seed=0", "strategy=tp,seed=1", "strategy=tp,seed=2"]
    assert runs[4] == Run("strategy=tp,seed=1", (("rl.credit.strategy", "tp"), ("seed", "1")))
    assert runs[4].flags() == ["--config.rl.credit.strategy=tp", "--config.seed=1"]


def test_names_are_filesystem_safe_and_unambiguous():
    runs = expand(["rl.lr=1e-4,3e-4", "sft.lr=0.003", "data.data_dir=/tmp/a b"])
    assert runs[0].name == "rl.lr=1e-4,sft.lr=0.003,data_dir=_tmp_a_b"  # shared leaf 'lr': full field
    assert runs[0].overrides[2] == ("data.data_dir", "/tmp/a b")  # the value itself is passed unchanged
    assert all("/" not in r.name and " " not in r.name for r in runs)


@pytest.mark.parametrize("specs,message", [
    (["seed"], "expected FIELD=V1,V2"), (["=1,2"], "expected FIELD=V1,V2"), (["seed=0,,1"], "expected FIELD=V1,V2"),
    (["seed=0", "seed=1"], "swept twice"), (["seed=1,1"], "repeated value"),
    (["data.data_dir=a/b,a_b"], "same run name"), ([], "at least one"),
])
def test_bad_sweep_specs_name_the_flag(specs, message):
    with pytest.raises(ValueError, match=message) as e:
        expand(specs)
    assert "--sweep" in str(e.value)


@pytest.mark.parametrize("specs,fixed,message", [
    (["rl.credit.strategy=uniform,bogus"], [], "'rl.credit.strategy' = 'bogus': must be one of"),
    (["rl.nope=1"], [], "flag --config.rl.nope=1: unknown config field"),
    (["seed=zero"], [], "flag --config.seed=zero"),
    (["seed=0"], ["--config.rl.steps=-1"], "'rl.steps' = -1: must be > 0"),
])
def test_bad_configs_fail_before_any_run(specs, fixed, message):
    with pytest.raises(ValueError, match=message):
        check_configs(os.path.join(ROOT, "configs", "default.py"), fixed, expand(specs))


def test_command_line_errors_exit_2(tmp_path, capsys):
    for argv in (["--sweep=seed=0", "--bogus"], ["--sweep=seed=0", "--config.run_dir=x"],
                 ["--sweep=seed=0", "--parallel=0"], ["--sweep=seed=0,1", "--only=seed=7"],
                 ["--sweep=seed=0", "--config=configs/nope.py:arg"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, f"--root={tmp_path}"])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_table_has_one_row_per_run_with_status_and_scalars(tmp_path):
    runs = expand(["seed=0,1"])
    os.makedirs(tmp_path / "seed=0")
    (tmp_path / "seed=0" / "summary.json").write_text(
        '{"eval_accuracy_after_rl": 0.25, "eval_accuracy_metric": "avg@4, t|1", "eval_per_family_after_rl": {"a": 1}}')
    md = write_table(str(tmp_path), runs, {"seed=0": "done", "seed=1": "failed (exit 1)"})
    assert open(md).read().splitlines() == [
        "| run | seed | status | eval_accuracy_after_rl | eval_accuracy_metric |",
        "| --- | --- | --- | --- | --- |",
        "| seed=0 | 0 | done | 0.25 | avg@4, t\\|1 |",
        "| seed=1 | 1 | failed (exit 1) |  |  |"]
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert rows[0]["eval_accuracy_metric"] == "avg@4, t|1" and rows[1]["status"] == "failed (exit 1)"


def test_a_failed_run_is_in_the_table_and_the_exit_code_but_the_others_run(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run_one(run, config, fixed, root):
        ran.append(run.name)
        if run.name == "seed=1":
            return "failed (exit 3)", 1.0
        os.makedirs(os.path.join(root, run.name))
        open(os.path.join(root, run.name, "summary.json"), "w").write('{"wall_time_s": 1.5}')
        return "done", 1.0

    monkeypatch.setattr(sweep_lib, "run_one", fake_run_one)
    assert main(["--sweep=seed=0,1,2", f"--config={ROOT}/configs/default.py", f"--root={tmp_path}"]) == 1
    assert sorted(ran) == ["seed=0", "seed=1", "seed=2"]
    out = capsys.readouterr().out
    assert "seed=1: failed (exit 3)" in out and out.splitlines()[-1] == str(tmp_path / "sweep.md")
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(r["status"], r["wall_time_s"]) for r in rows] == [
        ("done", "1.5"), ("failed (exit 3)", ""), ("done", "1.5")]


@pytest.mark.slow
@pytest.mark.heavy
def test_tiny_sweep_runs_writes_the_table_and_skips_finished_runs(tmp_path):
    fixed = {**TINY, "rl.steps": 2, "sft.steps": 4, "eval.num_problems": 20, "data.data_dir": tmp_path / "tfds"}
    cmd = [sys.executable, "-m", "tsched.sweep", "--config=configs/default.py", "--sweep=rl.credit.strategy=uniform,tp",
           "--sweep=seed=0,1", "--parallel=1", f"--root={tmp_path / 'sweep'}",
           *(f"--config.{k}={v}" for k, v in fixed.items())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "sweep" / "sweep.md")
    assert sum(": done in " in line for line in lines) == 4
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [(r["rl.credit.strategy"], r["seed"], r["status"]) for r in rows] == [
        ("uniform", "0", "done"), ("uniform", "1", "done"), ("tp", "0", "done"), ("tp", "1", "done")]
    assert {r["strategy"] for r in rows} == {"uniform", "tp"}  # the summary's own record of the run
    assert all(0 <= float(r["eval_accuracy_after_rl"]) <= 1 and float(r["wall_time_s"]) > 0 for r in rows)
    assert len(open(lines[-1]).read().splitlines()) == 2 + 4

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines() if line.startswith("skip ")]
    assert len(skipped) == 4 and all("summary.json exists" in line for line in skipped)
    assert "done in" not in again.stdout
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "sweep" / "sweep.csv"))] == ["cached"] * 4
