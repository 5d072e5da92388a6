"""A pool of verifier processes with a hard per-item deadline: a bad completion costs one reward, never the run.

Each worker is a separate OS process (`tsched.verify.worker`) fed one item at a time over a pipe. The
parent waits on all pipes with a deadline per in-flight item; a worker past its deadline is killed
(SIGKILL) and replaced, a worker that dies (segfault, `os._exit`, out of memory) is replaced, and only
the item it held is lost (reward 0, status `timeout` / `crashed`). Warm spare workers are kept so a
replacement does not stall the batch while a new process imports its checkers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import selectors
import subprocess
import sys
import threading
import time

from tsched.verify.verifiers import VERIFIERS

STATUSES = ("ok", "wrong", "no_answer", "timeout", "crashed", "error")
_STARTUP_TIMEOUT_S = 60.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Verdict:
    reward: float
    status: str  # one of STATUSES
    latency_s: float = 0.0


class _Worker:
    def __init__(self, memory_mb: int, plugins: tuple[str, ...]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "tsched.verify.worker", str(memory_mb), *plugins],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, bufsize=0)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: tuple[int, float, float] | None = None  # (item index, dispatch time, deadline)

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    def read_messages(self) -> list | None:
        """Complete JSON messages available now; None once the process has closed its stdout."""
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def kill(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.kill()
        self.proc.wait()


class VerifierPool:
    """`score(completions, answers, verifiers) -> list[Verdict]`, in input order. Use as a context manager.

    `plugins`: modules the workers import to register more verifiers by name (names unknown to the
    workers score 0 with status `error`).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 1024,
                 max_chars: int = 4096, spares: int | None = None, plugins: tuple[str, ...] = ()):
        self.num_workers, self.timeout_s, self.memory_mb, self.max_chars = num_workers, timeout_s, memory_mb, max_chars
        self.plugins = tuple(plugins)
        self._sel = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        # As many warm spares as workers: a whole round of killed workers is replaced without waiting.
        for _ in range(num_workers + (num_workers if spares is None else spares)):
            self._spawn()
        self._lock = threading.Lock()
        self._failed_starts = 0
        self.counts = collections.Counter()  # statuses over the pool's lifetime

    # ---- lifecycle
    def _spawn(self) -> None:
        w = _Worker(self.memory_mb, self.plugins)
        self._workers.append(w)
        self._sel.register(w.proc.stdout, selectors.EVENT_READ, w)

    def _replace(self, w: _Worker) -> None:
        self._sel.unregister(w.proc.stdout)
        self._workers.remove(w)
        w.kill()
        self._spawn()

    def close(self) -> None:
        for w in list(self._workers):
            self._sel.unregister(w.proc.stdout)
            w.kill()
        self._workers.clear()
        self._sel.close()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> int:
        """Number of worker processes currently running."""
        return sum(w.proc.poll() is None for w in self._workers)

    # ---- scoring
    def score(self, completions, answers, verifiers) -> list[Verdict]:
        if not (len(completions) == len(answers) == len(verifiers)):
            raise ValueError("completions, answers and verifiers must have the same length")
        with self._lock:
            results = self._score(list(completions), list(answers), list(verifiers))
        self.counts.update(v.status for v in results)
        return results

    def _prepare(self, completion) -> str:
        if isinstance(completion, bytes):
            completion = completion.decode("utf-8", errors="replace")
        # Keep the tail: the final answer is at the end, and a megabyte of text must not reach a parser.
        return str(completion)[-self.max_chars:]

    def _score(self, completions, answers, verifiers) -> list[Verdict]:
        n = len(completions)
        results: list[Verdict | None] = [None] * n
        pending = collections.deque()
        for i in range(n):
            if verifiers[i] in VERIFIERS or self.plugins:
                pending.append(i)
            else:
                results[i] = Verdict(0.0, "error")
        while pending or any(w.job for w in self._workers):
            now = time.monotonic()
            inflight = sum(w.job is not None for w in self._workers)
            for w in list(self._workers):
                if not pending or inflight >= self.num_workers:
                    break
                if w.ready and w.job is None:
                    i = pending.popleft()
                    w.job = (i, now, now + self.timeout_s)
                    inflight += 1
                    try:
                        w.send({"id": i, "completion": self._prepare(completions[i]), "answer": str(answers[i]),
                                "verifier": verifiers[i]})
                    except (BrokenPipeError, OSError):
                        results[i] = Verdict(0.0, "crashed", 0.0)
                        inflight -= 1
                        self._replace(w)
            deadlines = [w.job[2] for w in self._workers if w.job]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.05
            for key, _ in self._sel.select(wait_s):
                self._on_readable(key.data, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job and now >= w.job[2]:
                    i, t0, _ = w.job
                    results[i] = Verdict(0.0, "timeout", now - t0)
                    self._replace(w)
                elif not w.ready and now - w.started > _STARTUP_TIMEOUT_S:
                    self._failed_starts += 1
                    if self._failed_starts >= 3:
                        raise RuntimeError("verifier workers fail to start: run `python -m tsched.verify.worker 0`")
                    self._replace(w)
        return results  # type: ignore[return-value]

    def _on_readable(self, w: _Worker, results) -> None:
        if w not in self._workers:
            return
        try:
            msgs = w.read_messages()
        except ValueError:  # garbled output: treat the worker as broken
            msgs = None
        if msgs is None:  # the process died: only its in-flight item is lost
            if w.job:
                i, t0, _ = w.job
                results[i] = Verdict(0.0, "crashed", time.monotonic() - t0)
            self._replace(w)
            return
        for m in msgs:
            if m == "ready":
                w.ready, self._failed_starts = True, 0
            elif w.job and m["id"] == w.job[0]:
                i, t0, _ = w.job
                results[i] = Verdict(m["reward"], m["status"], time.monotonic() - t0)
                w.job = None
