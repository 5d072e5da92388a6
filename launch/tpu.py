"""Run tsched on Cloud TPU VMs with gcloud: create, set up, run, sweep, watch, tear down.

    python -m launch.tpu create --tpu=tsched-1 --accelerator-type=v5litepod-8 --spot
    python -m launch.tpu create --tpu=tsched-1 --queued --best-effort
    python -m launch.tpu setup  --tpu=tsched-1 [--repo=https://github.com/ORG/tsched --ref=main]
    python -m launch.tpu run    --tpu=tsched-1 --name=tp-seed0 --config=configs/default.py --config.seed=0
    python -m launch.tpu sweep  --tpu=tsched-1,tsched-2 --name=grpo-vs-tp \
        --sweep=rl.credit.strategy=uniform,tp --sweep=seed=0,1
    python -m launch.tpu status --tpu=tsched-1
    python -m launch.tpu logs   --tpu=tsched-1 --name=tp-seed0 [--lines=50]
    python -m launch.tpu stop   --tpu=tsched-1 --name=tp-seed0
    python -m launch.tpu delete --tpu=tsched-1 [--queued]

`--dry-run` on any verb prints the commands it would run, one per line, and runs none. The project
and zone come from --project / --zone, else $TSCHED_PROJECT / $TSCHED_ZONE, else gcloud's own
$CLOUDSDK_CORE_PROJECT / $CLOUDSDK_COMPUTE_ZONE; the TPU name from --tpu or $TSCHED_TPU.

On the workers the code lives in ~/tsched with its virtualenv in ~/tsched/.venv; a run writes to
~/tsched/runs/NAME on every worker, its output to runs/NAME/logs/worker-HOST.log. Runs are started
with `--config.train.resume=True`, so running the same --name again after a preemption continues
from the last checkpoint. Only the standard library is needed here: the launcher runs without JAX.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

from tsched.sweep import expand

REMOTE_DIR = "tsched"
UV = "uv==0.13.8"  # provisions Python 3.11 where the TPU image has an older python3 (jax needs >= 3.11)
ARCHIVE = os.path.join("runs", "launch", "tsched.tar.gz")
# What gcloud says when a zone has no TPUs of the asked type left (a stockout): worth waiting for.
CAPACITY = re.compile(r"no more capacity|insufficient (reserved )?capacity|resource_pool_exhausted|stockout|"
                      r"currently unavailable in the .* zone", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][\w.=,+-]*$")


class UsageError(Exception):
    """Bad or missing input: one line naming the flag, exit code 2."""


class CommandFailed(Exception):
    """A command exited non-zero: stop there (fail fast), exit code 1."""


# ---- Running commands

def shell(cmd: list[str]) -> tuple[int, str]:
    """Runs `cmd` with its stdout on ours and its stderr echoed live and returned -> (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:
        sys.stderr.write(line)
        err.append(line)
    return proc.wait(), "".join(err)


def execute(cmds: list[list[str]], dry_run: bool, runner=shell, sleep=time.sleep, retries: int = 0,
            backoff_s: float = 30.0, max_backoff_s: float = 600.0) -> None:
    """Runs the commands in order, stopping at the first failure; with `dry_run`, prints them instead.

    A command refused for lack of capacity (CAPACITY) is tried again up to `retries` times, after
    backoff_s, 2 backoff_s, 4 backoff_s, ... (at most max_backoff_s) seconds.
    """
    for cmd in cmds:
        if dry_run:
            print(shlex.join(cmd))
            continue
        for attempt in range(retries + 1):
            code, err = runner(cmd)
            if code == 0:
                break
            if attempt == retries or not CAPACITY.search(err):
                workers = sorted(set(re.findall(r"tsched worker (\S+) failed", err)))
                where = f" on worker {', '.join(workers)}" if workers else ""
                raise CommandFailed(f"exit {code}{where}: {shlex.join(cmd)}")
            delay = min(backoff_s * 2 ** attempt, max_backoff_s)
            print(f"no capacity; trying again in {delay:.0f} s ({attempt + 1}/{retries})", file=sys.stderr)
            sleep(delay)


# ---- Commands of each verb (pure: arguments -> gcloud command lines)

def _gcloud(args, *words: str, alpha: bool = False) -> list[str]:
    """`gcloud [alpha] compute tpus WORDS... --zone=Z --project=P` (WORDS end with the resource name)."""
    return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", *words,
            f"--zone={args.zone}", f"--project={args.project}"]


def _ssh(args, tpu: str, script: str) -> list[str]:
    return [*_gcloud(args, "tpu-vm", "ssh", tpu), "--worker=all", f"--command={script}"]


def _worker(args, tpu: str, *argv: str) -> list[str]:
    """`launch.worker ARGV` on every worker of `tpu`, from the code directory."""
    return _ssh(args, tpu, f"cd {REMOTE_DIR} && " + shlex.join([".venv/bin/python", "-m", "launch.worker", *argv]))


def create(args) -> list[list[str]]:
    if args.best_effort and not args.queued:
        raise UsageError("flag --best-effort: only queued resources offer it; add --queued")
    model = [f"--{m}" for m in ("spot", "reserved", "best-effort") if getattr(args, m.replace("-", "_"))]
    if args.queued:  # --best-effort is only in gcloud's alpha track
        return [[*_gcloud(args, "queued-resources", "create", args.tpu, alpha=args.best_effort),
                 f"--node-id={args.tpu}", f"--accelerator-type={args.accelerator_type}",
                 f"--runtime-version={args.runtime_version}", *model]]
    return [[*_gcloud(args, "tpu-vm", "create", args.tpu), f"--accelerator-type={args.accelerator_type}",
             f"--version={args.runtime_version}", *model]]


def setup(args) -> list[list[str]]:
    """Code onto every worker (this checkout's HEAD, or a clone of --repo at --ref), then the venv."""
    d = REMOTE_DIR
    # Every step on its own under `set -e`: the ERR trap then names the worker that failed.
    venv = [f"cd {d}", f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user {UV}",
            "~/.local/bin/uv venv -q --allow-existing --python 3.11 .venv",
            "~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt -r requirements-tpu.txt",
            '.venv/bin/python -c "import jax; print(jax.__version__)"']
    # No single quotes in these scripts: shlex.quote then prints them in one readable piece.
    head = ["set -eu", 'trap "s=\\$?; echo tsched worker \\$(hostname) failed: setup step exited \\$s >&2" ERR']
    if args.repo:
        code = [f"test -d {d}/.git || git clone -q {shlex.quote(args.repo)} {d}",
                f"git -C {d} fetch -q origin {shlex.quote(args.ref)}", f"git -C {d} checkout -q --detach FETCH_HEAD"]
        return [_ssh(args, args.tpu, "; ".join(head + code + venv))]
    archive = os.path.basename(ARCHIVE)
    code = [f"mkdir -p {d}", f"tar -xzf {archive} -C {d}", f"rm {archive}"]
    return [["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
            [*_gcloud(args, "tpu-vm", "scp", ARCHIVE, f"{args.tpu}:{archive}"), "--worker=all"],
            _ssh(args, args.tpu, "; ".join(head + code + venv))]


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"flag --name={name!r}: use letters, digits and ._=,+- (it names a directory)")
    return name


def _overrides(args) -> list[str]:
    bad = [a for a in args.overrides if not a.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognized argument {bad[0]!r}: only --config.FIELD=VALUE overrides pass through")
    if any(a.startswith("--config.run_dir") for a in args.overrides):
        raise UsageError("flag --config.run_dir: a run writes to runs/<--name> on each worker; set --name instead")
    return args.overrides


def run(args) -> list[list[str]]:
    name = _check_name(args.name)
    argv = ["-m", "tsched.main", f"--config={args.config}", f"--config.run_dir=runs/{name}",
            "--config.train.resume=True", *_overrides(args)]
    return [_worker(args, args.tpu, "start", f"--name={name}", "--", *argv)]


def sweep(args) -> list[list[str]]:
    """The grid's runs dealt round-robin over the TPUs of --tpu; on each, `tsched.sweep` runs its
    share one after another into runs/<--name>/<run name>."""
    name, fixed = _check_name(args.name), _overrides(args)
    try:
        runs = expand(args.sweep)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tpus = args.tpu.split(",")
    cmds = []
    for i, tpu in enumerate(tpus):
        share = runs[i::len(tpus)]
        if share:
            argv = ["-m", "tsched.sweep", f"--config={args.config}", *(f"--sweep={s}" for s in args.sweep),
                    f"--root=runs/{name}", *(f"--only={r.name}" for r in share), *fixed]
            cmds.append(_worker(args, tpu, "start", f"--name={name}", "--", *argv))
    return cmds


def status(args) -> list[list[str]]:
    describe = _gcloud(args, "queued-resources" if args.queued else "tpu-vm", "describe", args.tpu)
    return [describe, _worker(args, args.tpu, "status")]


def logs(args) -> list[list[str]]:
    return [_worker(args, args.tpu, "logs", f"--name={_check_name(args.name)}", f"--lines={args.lines}")]


def stop(args) -> list[list[str]]:
    return [_worker(args, args.tpu, "stop", f"--name={_check_name(args.name)}")]


def delete(args) -> list[list[str]]:
    if args.queued:  # --force deletes the queued resource's node too
        return [[*_gcloud(args, "queued-resources", "delete", args.tpu), "--force", "--quiet"]]
    return [[*_gcloud(args, "tpu-vm", "delete", args.tpu), "--quiet"]]


VERBS = {"create": create, "setup": setup, "run": run, "sweep": sweep, "status": status, "logs": logs,
         "stop": stop, "delete": delete}


# ---- Command line

def _from_env(value: str | None, flag: str, *env: str) -> str:
    for v in (value, *(os.environ.get(e) for e in env)):
        if v:
            return v
    raise UsageError(f"{flag} is not set: pass {flag}=... or set ${env[0]}"
                     + (f" (or ${env[1]})" if len(env) > 1 else ""))


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tpu", help="TPU VM (and queued resource) name; $TSCHED_TPU; sweep: comma-separated")
    common.add_argument("--project", help="$TSCHED_PROJECT, else $CLOUDSDK_CORE_PROJECT")
    common.add_argument("--zone", help="$TSCHED_ZONE, else $CLOUDSDK_COMPUTE_ZONE")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    top = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
    verbs = top.add_subparsers(dest="verb", required=True)
    add = lambda verb, text: verbs.add_parser(verb, parents=[common], help=text, description=text)

    p = add("create", "create a TPU VM, or a queued resource with --queued")
    p.add_argument("--accelerator-type", default=os.environ.get("TSCHED_ACCELERATOR_TYPE", "v5litepod-8"),
                   help="$TSCHED_ACCELERATOR_TYPE; default v5litepod-8")
    p.add_argument("--runtime-version", default=os.environ.get("TSCHED_RUNTIME_VERSION", "v2-alpha-tpuv5-lite"),
                   help="TPU software version; $TSCHED_RUNTIME_VERSION; default v2-alpha-tpuv5-lite")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted)")
    model.add_argument("--reserved", action="store_true", help="from the project's reservation")
    model.add_argument("--best-effort", action="store_true", help="best-effort queued resource (needs --queued)")
    p.add_argument("--queued", action="store_true", help="ask through the queued-resources API (waits in a queue)")
    p.add_argument("--retries", type=int, default=8, help="tries again this often when the zone has no capacity")
    p.add_argument("--backoff-s", type=float, default=30.0, help="first wait before trying again; doubles each time")

    p = add("setup", "copy or clone the code to every worker and create its virtualenv")
    p.add_argument("--repo", default=os.environ.get("TSCHED_REPO"),
                   help="git URL to clone on the workers ($TSCHED_REPO); default: copy this checkout's HEAD")
    p.add_argument("--ref", default="main", help="branch, tag or commit of --repo")

    for verb, text in (("run", "start one run on every worker, detached"),
                       ("sweep", "start a grid of runs, dealt over the TPUs of --tpu, one after another on each")):
        p = add(verb, text + "; any --config.FIELD=VALUE passes through")
        p.add_argument("--name", required=True, help="the run's (sweep's) directory: runs/NAME on each worker")
        p.add_argument("--config", default="configs/default.py",
                       help="config file, passed on unchanged (a ':arg' suffix included)")
    p.add_argument("--sweep", action="append", required=True, metavar="FIELD=V1,V2", help="repeat for a product")

    add("status", "the TPU's state and every run on every worker").add_argument(
        "--queued", action="store_true", help="describe the queued resource")
    p = add("logs", "the end of a run's log on every worker")
    p.add_argument("--name", required=True)
    p.add_argument("--lines", type=int, default=20)
    add("stop", "stop a run on every worker (SIGTERM)").add_argument("--name", required=True)
    add("delete", "delete the TPU VM, or the queued resource and its node with --queued").add_argument(
        "--queued", action="store_true")
    return top


def main(argv: list[str] | None = None, runner=shell, sleep=time.sleep) -> int:
    args, extra = parser().parse_known_args(argv)
    args.overrides = extra
    try:
        if extra and args.verb not in ("run", "sweep"):
            raise UsageError(f"unrecognized argument {extra[0]!r}")
        args.tpu = _from_env(args.tpu, "--tpu", "TSCHED_TPU")
        if "," in args.tpu and args.verb != "sweep":
            raise UsageError(f"flag --tpu={args.tpu}: one TPU name here (a comma-separated list is for sweep)")
        args.project = _from_env(args.project, "--project", "TSCHED_PROJECT", "CLOUDSDK_CORE_PROJECT")
        args.zone = _from_env(args.zone, "--zone", "TSCHED_ZONE", "CLOUDSDK_COMPUTE_ZONE")
        cmds = VERBS[args.verb](args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verb == "setup" and not args.repo and not args.dry_run:
        os.makedirs(os.path.dirname(ARCHIVE), exist_ok=True)
    retry = {"retries": args.retries, "backoff_s": args.backoff_s} if args.verb == "create" else {}
    try:
        execute(cmds, args.dry_run, runner, sleep, **retry)
    except CommandFailed as e:
        print(f"error: {args.verb} failed, {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
