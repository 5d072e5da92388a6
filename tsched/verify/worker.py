"""A verifier worker process: JSON lines in on stdin, JSON lines out on stdout.

Started by `VerifierPool` as `python -m tsched.verify.worker MEMORY_MB [PLUGIN_MODULE ...]`; plugin
modules register more verifiers by name (`tsched.verify.verifiers.register`). It imports only the verifiers
(never JAX), caps its own address space so a memory bomb kills this process and not the machine, and
runs every check in its main thread, where math-verify's signal-based timeouts work. The parent enforces
the hard deadline by killing the process.
"""

from __future__ import annotations

import json
import resource
import signal
import sys


def main() -> None:
    memory_mb = int(sys.argv[1])
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Ctrl-C, or a preemption's SIGTERM sent to the whole process group, goes to the trainer: it finishes
    # its step (which needs us) and shuts us down; we exit on our own when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    import importlib

    from tsched.verify import verifiers
    import math_verify  # noqa: F401  warm up sympy before saying ready, so the first item is not slow

    for plugin in sys.argv[2:]:
        importlib.import_module(plugin)

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            check = verifiers.VERIFIERS.get(job["verifier"])
            reward, status = check(job["completion"], job["answer"]) if check else (0.0, "error")
        except MemoryError:
            reward, status = 0.0, "crashed"
        except Exception:  # a parser that raises costs this one item, never the worker
            reward, status = 0.0, "error"
        out.write(json.dumps({"id": job["id"], "reward": float(reward), "status": status}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
