"""launch.tpu: every verb's --dry-run against golden files, input errors, and the capacity retry loop.

Regenerate the golden files after an intended change with
    UPDATE_GOLDEN=1 python -m pytest -q tests/launch/test_tpu.py
and review the diff; without UPDATE_GOLDEN a difference fails.
"""

import os

import pytest

from launch import tpu

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ENV = ("TSCHED_TPU", "TSCHED_PROJECT", "TSCHED_ZONE", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE",
       "TSCHED_ACCELERATOR_TYPE", "TSCHED_RUNTIME_VERSION", "TSCHED_REPO")
WHERE = ["--tpu=tsched-1", "--project=my-project", "--zone=us-west4-a"]
SWEEP = ["--sweep=rl.credit.strategy=uniform,tp", "--sweep=seed=0,1"]

CASES = {
    "create": ["create", *WHERE],
    "create_spot": ["create", *WHERE, "--spot", "--accelerator-type=v5litepod-16"],
    "create_reserved": ["create", *WHERE, "--reserved"],
    "create_queued_spot": ["create", *WHERE, "--queued", "--spot"],
    "create_queued_best_effort": ["create", *WHERE, "--queued", "--best-effort"],
    "setup_copy": ["setup", *WHERE],
    "setup_clone": ["setup", *WHERE, "--repo=https://github.com/ORG/tsched", "--ref=v0.1"],
    "run": ["run", *WHERE, "--name=grpo-seed0", "--config=configs/paper.py:method=grpo", "--config.seed=0",
            "--config.rl.steps=200"],
    "sweep_queued_on_one_tpu": ["sweep", *WHERE, "--name=tp-vs-grpo", *SWEEP, "--config.rl.steps=80"],
    "sweep_one_run_per_tpu": ["sweep", "--tpu=tpu-a,tpu-b,tpu-c,tpu-d", "--project=my-project",
                              "--zone=us-west4-a", "--name=tp-vs-grpo", *SWEEP],
    "status": ["status", *WHERE],
    "status_queued": ["status", *WHERE, "--queued"],
    "logs": ["logs", *WHERE, "--name=grpo-seed0", "--lines=50"],
    "stop": ["stop", *WHERE, "--name=grpo-seed0"],
    "delete": ["delete", *WHERE],
    "delete_queued": ["delete", *WHERE, "--queued"],
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def never_run(cmd):
    raise AssertionError(f"--dry-run ran {cmd}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case, capsys):
    assert tpu.main([*CASES[case], "--dry-run"], runner=never_run) == 0
    out = capsys.readouterr().out
    path = os.path.join(GOLDEN, f"{case}.txt")
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(out)
    assert os.path.exists(path), f"no golden file {path}: run with UPDATE_GOLDEN=1 and review it"
    assert out == open(path).read()


def test_dry_run_prints_one_gcloud_command_per_line(capsys):
    tpu.main([*CASES["sweep_one_run_per_tpu"], "--dry-run"], runner=never_run)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # 2 x 2 runs over 4 TPUs: one each
    assert all(line.startswith("gcloud compute tpus tpu-vm ssh ") and "--worker=all" in line for line in lines)
    assert "--only=strategy=uniform,seed=0'" in lines[0] and "--only=strategy=tp,seed=1'" in lines[3]


def test_project_and_zone_come_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("TSCHED_TPU", "env-tpu")
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "gcloud-project")
    monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "gcloud-zone")
    monkeypatch.setenv("TSCHED_ZONE", "tsched-zone")  # wins over gcloud's variable
    assert tpu.main(["delete", "--dry-run"], runner=never_run) == 0
    assert capsys.readouterr().out == (
        "gcloud compute tpus tpu-vm delete env-tpu --zone=tsched-zone --project=gcloud-project --quiet\n")
    assert tpu.main(["delete", "--dry-run", "--project=flag-project"], runner=never_run) == 0
    assert "--project=flag-project" in capsys.readouterr().out


@pytest.mark.parametrize("missing,env", [("--project", "TSCHED_PROJECT"), ("--zone", "TSCHED_ZONE"),
                                         ("--tpu", "TSCHED_TPU")])
def test_missing_project_zone_or_tpu_is_one_clear_error(missing, env, capsys):
    argv = [a for a in ["run", *WHERE, "--name=x", "--dry-run"] if not a.startswith(missing + "=")]
    assert tpu.main(argv, runner=never_run) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and missing in err and env in err


@pytest.mark.parametrize("argv,flag", [
    (["create", *WHERE, "--best-effort"], "--best-effort"),
    (["run", *WHERE, "--name=a/b"], "--name"),
    (["run", *WHERE, "--name=x", "--config.run_dir=elsewhere"], "--config.run_dir"),
    (["run", *WHERE, "--name=x", "--seed=1"], "--seed=1"),
    (["sweep", *WHERE, "--name=x", "--sweep=seed"], "--sweep"),
    (["status", *WHERE, "--config.seed=1"], "--config.seed=1"),
    (["run", "--tpu=a,b", "--project=p", "--zone=z", "--name=x"], "--tpu"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    assert tpu.main([*argv, "--dry-run"], runner=never_run) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and flag in err


class FakeRunner:
    """Answers each call with the next (exit code, stderr) of `replies`, recording the commands."""

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, cmd):
        self.calls.append(cmd)
        return self.replies.pop(0)


STOCKOUT = (1, 'ERROR: (gcloud.compute.tpus.tpu-vm.create) {"code": 8, "message": "There is no more capacity '
               'in the zone \\"us-west4-a\\"; you can try in another zone"}\n')


def test_create_retries_on_capacity_with_exponential_backoff():
    runner, slept = FakeRunner(STOCKOUT, STOCKOUT, STOCKOUT, (0, "")), []
    code = tpu.main(["create", *WHERE, "--spot", "--backoff-s=10"], runner=runner, sleep=slept.append)
    assert code == 0
    assert slept == [10, 20, 40]
    assert len(runner.calls) == 4 and all(c == runner.calls[0] for c in runner.calls)




def test_gives_up_after_the_retries(capsys):
    runner, slept = FakeRunner(*[STOCKOUT] * 4), []
    code = tpu.main(["create", *WHERE, "--retries=3", "--backoff-s=300"], runner=runner, sleep=slept.append)
    assert code == 1
    assert slept == [300, 600, 600]  # doubling, capped at 600 s
    assert len(runner.calls) == 4
    assert "create failed, exit 1" in capsys.readouterr().err


def test_other_errors_fail_fast_naming_the_worker(capsys):
    runner = FakeRunner((1, "tsched worker t1v-n-0-w-2 failed: setup step exited 1\n"), (0, ""))
    slept = []
    code = tpu.main(["setup", *WHERE, "--repo=https://github.com/ORG/tsched"], runner=runner, sleep=slept.append)
    assert code == 1 and slept == []
    assert len(runner.calls) == 1
    err = capsys.readouterr().err
    assert "on worker t1v-n-0-w-2" in err and "gcloud compute tpus tpu-vm ssh tsched-1" in err


def test_a_failing_step_stops_the_steps_after_it():
    runner = FakeRunner((0, ""), (255, "ssh: connect to host 10.0.0.2 port 22: Connection refused\n"), (0, ""))
    assert tpu.main(["sweep", "--tpu=a,b,c", "--project=p", "--zone=z", "--name=s", *SWEEP], runner=runner) == 1
    assert [c[5] for c in runner.calls] == ["a", "b"]  # c was never started


def test_only_create_retries_on_capacity():
    runner = FakeRunner(STOCKOUT, (0, ""))
    assert tpu.main(["status", *WHERE], runner=runner, sleep=lambda s: None) == 1
    assert len(runner.calls) == 1
