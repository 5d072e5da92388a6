"""Fault injection for end-to-end tests: run `python -m tsched.main` as a subprocess and kill it at chosen moments.

A moment is a point in the event sequence of an uninterrupted run: the trainer prints
`tsched-event: <name> [<step>]` lines on stderr under TSCHED_TRACE_EVENTS=1 (start, setup_done, sft_step N,
sft_save_start N, sft_save_end N, eval_before_start, eval_before_end, rl_step N, rl_save_start N,
rl_save_end N, eval_after_start, eval_after_end, done). `Moment(index, delay_s)` means: `delay_s` seconds
after the first event whose position in the reference sequence is >= `index`. A resumed run repeats some
events (start, setup_done, steps after its checkpoint); their reference positions say where it is, so a
chain of moments in increasing order applies each one in a later launch: kill, resume, kill later, ...,
then a last launch that finishes.

`Moment.at_fraction(f)` instead kills `f` x the reference's wall time after the launch (a moment the
event sequence does not name).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS_END = ("_s",)  # metrics that measure time (sample_s, verify_latency_p99_s, sample_tokens_per_s)


@dataclasses.dataclass(frozen=True)
class Moment:
    index: int | None  # position in the reference event sequence; None: use `fraction`
    delay_s: float = 0.0
    fraction: float | None = None  # of the reference wall time, from the launch

    @classmethod
    def at_fraction(cls, fraction: float) -> "Moment":
        return cls(None, 0.0, fraction)


def env(cache_dir: str) -> dict:
    """The subprocess environment: events on, and one persistent compilation cache for every launch of a
    test module, so only the first launch compiles (the cached executables are the same programs)."""
    return dict(os.environ, PYTHONPATH=ROOT, TSCHED_TRACE_EVENTS="1", JAX_COMPILATION_CACHE_DIR=cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@dataclasses.dataclass
class Launch:
    returncode: int
    events: list  # [(name, step or None)] in order
    stderr: str
    stdout: str
    wall_s: float


def _parse(line: str):
    parts = line.split()
    return parts[1], (int(parts[2]) if len(parts) > 2 else None)


def launch(command, cwd, environ, reference=None, moment: Moment | None = None, sig=signal.SIGKILL,
           ref_wall_s: float = 0.0, timeout_s: float = 900) -> Launch:
    """Runs `command`; with a moment, sends `sig` at it (see the module docstring)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events, err_lines, out_lines = [], [], []
    position = {e: i for i, e in enumerate(reference or [])}
    fired = threading.Event()

    def fire(after_s: float):
        time.sleep(after_s)
        if proc.poll() is None and not fired.is_set():
            fired.set()
            proc.send_signal(sig)

    out_thread = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    out_thread.start()
    if moment is not None and moment.fraction is not None:
        threading.Thread(target=fire, args=(moment.fraction * ref_wall_s,), daemon=True).start()
    for line in proc.stderr:
        err_lines.append(line)
        if line.startswith("tsched-event:"):
            events.append(_parse(line))
            if (moment is not None and moment.index is not None and not fired.is_set()
                    and position.get(events[-1], -1) >= moment.index):
                if moment.delay_s:
                    threading.Thread(target=fire, args=(moment.delay_s,), daemon=True).start()
                else:
                    fire(0.0)
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
    proc.wait()
    out_thread.join(timeout=10)
    return Launch(proc.returncode, events, "".join(err_lines), "".join(out_lines), time.monotonic() - t0)


def random_moments(reference: list, n: int, seed: int, max_delay_s: float = 0.3, phases=None) -> list[Moment]:
    """`n` seeded moments spread over the reference events (optionally only events whose name is in
    `phases`), sorted, distinct, each with a random delay in [0, max_delay_s]."""
    rng = random.Random(seed)
    candidates = [i for i, (name, _) in enumerate(reference) if phases is None or name in phases]
    picks = sorted(rng.sample(candidates, n))
    return [Moment(i, round(rng.uniform(0, max_delay_s), 3)) for i in picks]


def comparable_rows(path: str) -> list[dict]:
    """metrics.jsonl without the timing measurements (which no two runs share)."""
    import json

    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS_END)} for r in rows]
