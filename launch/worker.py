"""The worker side of `launch.tpu`: start, watch and stop detached runs on one TPU VM worker.

`python -m launch.tpu` calls it on every worker at once through `gcloud ... ssh --worker=all`, from the
code directory set up there:

    .venv/bin/python -m launch.worker start --name=NAME -- -m tsched.main --config=... [--config.F=V ...]
    .venv/bin/python -m launch.worker status
    .venv/bin/python -m launch.worker logs --name=NAME [--lines=20]
    .venv/bin/python -m launch.worker stop --name=NAME

A run's output goes to `runs/NAME/logs/worker-HOST.log` and its process group id to
`worker-HOST.pid` beside it. Every line printed starts with the worker's host name because gcloud
interleaves the output of all workers; a failure prints `tsched worker HOST failed: ...` (what
`launch.tpu` looks for to name the failing worker) and exits 1.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import subprocess
import sys

HOST = socket.gethostname()
GRACE_S = 5.0  # a run that dies this early (bad flag, bad config) is reported as a failed start


class WorkerError(Exception):
    pass


def _paths(name: str) -> tuple[str, str]:
    logs = os.path.join("runs", name, "logs")
    return os.path.join(logs, f"worker-{HOST}.log"), os.path.join(logs, f"worker-{HOST}.pid")


def _running(pid_path: str) -> int | None:
    """The run's process group id if it is still alive."""
    try:
        pid = int(open(pid_path).read())
        os.killpg(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _tail(path: str, lines: int) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-lines:]


def start(name: str, argv: list[str]) -> None:
    """Starts `python ARGV` in its own session (it outlives the ssh connection), output to the log."""
    log_path, pid_path = _paths(name)
    if _running(pid_path):
        raise WorkerError(f"run {name} is already running (pid file {pid_path})")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    with open(pid_path, "w") as f:
        f.write(str(proc.pid))
    try:
        code = proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"{HOST}: started {name} (pid {proc.pid}), log {log_path}")
        return
    if code:
        tail = "\n".join(f"{HOST}: {line}" for line in _tail(log_path, 20))
        raise WorkerError(f"run {name} exited with code {code} at start; end of {log_path}:\n{tail}")
    print(f"{HOST}: {name} finished at once (exit 0), log {log_path}")


def status() -> None:
    """One line per run on this worker: running or exited, and the last line of its log."""
    pid_paths = sorted(glob.glob(os.path.join("runs", "*", "logs", f"worker-{HOST}.pid")))
    if not pid_paths:
        print(f"{HOST}: no runs")
    for pid_path in pid_paths:
        name = pid_path.split(os.sep)[1]
        state = "running" if _running(pid_path) else "exited"
        last = _tail(_paths(name)[0], 1)
        print(f"{HOST}: {name}: {state}: {last[0] if last else '(empty log)'}")


def logs(name: str, lines: int) -> None:
    log_path, _ = _paths(name)
    if not os.path.exists(log_path):
        raise WorkerError(f"run {name} has no log here ({log_path})")
    for line in _tail(log_path, lines):
        print(f"{HOST}: {line}")


def stop(name: str) -> None:
    """SIGTERM to the run's process group (the trainer and its verifier workers)."""
    _, pid_path = _paths(name)
    pid = _running(pid_path)
    if pid is None:
        print(f"{HOST}: {name} is not running")
        return
    os.killpg(pid, signal.SIGTERM)
    print(f"{HOST}: sent SIGTERM to {name} (process group {pid})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.worker", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("start", help="start `python ARGS...` detached, logging into runs/NAME/logs")
    p.add_argument("--name", required=True)
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the python arguments (-m MODULE ...)")
    verbs.add_parser("status", help="every run on this worker")
    p = verbs.add_parser("logs", help="the end of a run's log")
    p.add_argument("--name", required=True)
    p.add_argument("--lines", type=int, default=20)
    p = verbs.add_parser("stop", help="SIGTERM a run")
    p.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        if args.verb == "start":
            start(args.name, args.args[1:] if args.args[:1] == ["--"] else args.args)
        elif args.verb == "status":
            status()
        elif args.verb == "logs":
            logs(args.name, args.lines)
        else:
            stop(args.name)
    except WorkerError as e:
        print(f"tsched worker {HOST} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
