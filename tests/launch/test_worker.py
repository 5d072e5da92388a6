"""launch.worker on this machine, as gcloud runs it on a TPU worker: real detached processes."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = socket.gethostname()


def worker(tmp_path, *argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "launch.worker", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_start_status_logs_stop(tmp_path):
    program = "import time; print('step 1', flush=True); time.sleep(120)"
    out = worker(tmp_path, "start", "--name=demo", "--", "-c", program)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{HOST}: started demo")
    assert f"{HOST}: demo: running: step 1" in worker(tmp_path, "status").stdout
    assert worker(tmp_path, "logs", "--name=demo").stdout == f"{HOST}: step 1\n"
    again = worker(tmp_path, "start", "--name=demo", "--", "-c", program)
    assert again.returncode == 1 and "already running" in again.stderr

    assert "sent SIGTERM" in worker(tmp_path, "stop", "--name=demo").stdout
    deadline = time.monotonic() + 30
    while "running" in worker(tmp_path, "status").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"{HOST}: demo: exited" in worker(tmp_path, "status").stdout
    assert "is not running" in worker(tmp_path, "stop", "--name=demo").stdout


def test_a_run_that_dies_at_start_fails_naming_the_worker(tmp_path):
    out = worker(tmp_path, "start", "--name=bad", "--", "-c", "import sys; sys.exit('bad flag --config.nope')")
    assert out.returncode == 1
    assert f"tsched worker {HOST} failed: run bad exited with code 1 at start" in out.stderr
    assert "bad flag --config.nope" in out.stderr  # the log's end comes with it
    assert os.path.exists(tmp_path / "runs" / "bad" / "logs" / f"worker-{HOST}.log")


def test_status_and_logs_without_runs(tmp_path):
    assert worker(tmp_path, "status").stdout == f"{HOST}: no runs\n"
    out = worker(tmp_path, "logs", "--name=none")
    assert out.returncode == 1 and f"tsched worker {HOST} failed: run none has no log" in out.stderr
