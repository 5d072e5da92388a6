"""Built-in verifiable task families: each problem comes with an exact answer and a step-by-step solution.

Every family is one function `(rng, difficulty) -> Problem`, registered in `FAMILIES`. Solutions write
intermediate results out and end with `Answer: <answer>`, which is what the verifiers extract. The
difficulty knob lengthens the reasoning: `arith` at difficulty d has d steps of about 13 tokens each, so
difficulty 8 gives traces of over 100 tokens with the answer only at the end, the regime the paper's
trajectory-percentile schedule is about.

Solutions with slips (`error_rate`, `data.solution_error_rate`): the running-value families
(SLIP_FAMILIES; the others ignore it) can write each intermediate result off by one with a given
probability and carry on from the slipped value, so that solution ends at a wrong answer while the
problem keeps its true one. A model fine-tuned on them learns to slip at about that rate at every step
of a long trace, however well it knows the steps: a policy whose errors are spread over the whole
trajectory, which RL can remove. The slips come from their own random stream, so the problems (and
the solutions that did not slip) are those of rate 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np

ANSWER_PREFIX = "Answer: "


@dataclasses.dataclass(frozen=True)
class Problem:
    family: str
    difficulty: int
    problem: str  # the prompt text
    solution: str  # step-by-step reference solution, ending with ANSWER_PREFIX + answer
    answer: str
    verifier: str  # name of the verifier in tsched.verify that checks this family


Slip = Callable[[int], int]  # an intermediate result as the solution writes it (see SLIP_FAMILIES)


def _exact(value: int) -> int:
    return value


def slips(rng: np.random.Generator, rate: float) -> Slip:
    """Writes a result off by one (up or down, evenly) with probability `rate`, drawing from `rng`."""
    def slip(value: int) -> int:
        return value + int(rng.choice((-1, 1))) if rng.random() < rate else value
    return slip


def arith(rng: np.random.Generator, difficulty: int, slip: Slip = _exact) -> Problem:
    """Chain of difficulty+1 two-digit numbers joined by + and -, evaluated left to right."""
    nums = rng.integers(1, 100, size=difficulty + 1)
    ops = rng.choice(["+", "-"], size=difficulty)
    expr = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:]))
    acc, steps = int(nums[0]), []
    for o, n in zip(ops, nums[1:]):
        new = slip(acc + int(n) if o == "+" else acc - int(n))
        steps.append(f"{acc}{o}{n}={new}.")
        acc = new
    answer = int(nums[0]) + sum(int(n) if o == "+" else -int(n) for o, n in zip(ops, nums[1:]))
    return Problem("arith", difficulty, f"Compute {expr}.", " ".join(steps) + f" {ANSWER_PREFIX}{acc}",
                   str(answer), "numeric")


def mult(rng: np.random.Generator, difficulty: int) -> Problem:
    """A (difficulty+1)-digit number times a digit, by schoolbook multiplication with carries."""
    a = int(rng.integers(10 ** difficulty, 10 ** (difficulty + 1)))
    b = int(rng.integers(2, 10))
    digits = [int(d) for d in str(a)][::-1]
    carry, steps = 0, []
    for i, d in enumerate(digits):
        v = d * b + carry
        term = f"{d}*{b}+{carry}" if carry else f"{d}*{b}"
        if i == len(digits) - 1:
            steps.append(f"{term}={v}.")
        else:
            steps.append(f"{term}={v}, write {v % 10} carry {v // 10}.")
        carry = v // 10
    return Problem("mult", difficulty, f"Compute {a}*{b}.", " ".join(steps) + f" {ANSWER_PREFIX}{a * b}",
                   str(a * b), "numeric")


def gcd(rng: np.random.Generator, difficulty: int) -> Problem:
    """Greatest common divisor by Euclid's algorithm, one `a mod b` step at a time."""
    hi = int(10 ** (1 + 0.5 * difficulty))
    g = int(rng.integers(1, max(2, hi // 10)))
    a, b = sorted((int(rng.integers(1, hi // g + 1)) * g for _ in range(2)), reverse=True)
    if a == b:
        a += g
    x, y, steps = a, b, []
    while y:
        steps.append(f"{x} mod {y}={x % y}.")
        x, y = y, x % y
    return Problem("gcd", difficulty, f"Find gcd({a},{b}).", " ".join(steps) + f" {ANSWER_PREFIX}{x}",
                   str(x), "numeric")


def sort(rng: np.random.Generator, difficulty: int) -> Problem:
    """Sort difficulty+2 numbers ascending by repeatedly taking the minimum of what is left."""
    nums = [int(v) for v in rng.integers(0, 100, size=difficulty + 2)]
    rest, steps = list(nums), []
    while rest:
        m = min(rest)
        rest.remove(m)
        steps.append(f"min {m}.")
    answer = " ".join(str(v) for v in sorted(nums))
    return Problem("sort", difficulty, "Sort " + " ".join(map(str, nums)) + ".",
                   " ".join(steps) + f" {ANSWER_PREFIX}{answer}", answer, "exact")


def chain(rng: np.random.Generator, difficulty: int, slip: Slip = _exact) -> Problem:
    """Running sum of 3*difficulty+3 one-digit numbers, one addition per step.

    Each step is easy (a two-digit number plus a digit) and the trace is long (difficulty 1-3: 6-12
    numbers, about 55-110 tokens) with the answer only at the end: a small model learns the steps
    quickly, and a sampled trace fails when any one of them slips, which is what RL at temperature 1
    improves on."""
    nums = [int(v) for v in rng.integers(1, 10, size=3 * difficulty + 3)]
    acc, steps = nums[0], []
    for n in nums[1:]:
        new = slip(acc + n)
        steps.append(f"{acc}+{n}={new}.")
        acc = new
    return Problem("chain", difficulty, "Add " + "+".join(map(str, nums)) + ".",
                   " ".join(steps) + f" {ANSWER_PREFIX}{acc}", str(sum(nums)), "numeric")


FAMILIES: dict[str, Callable[..., Problem]] = {
    "arith": arith, "mult": mult, "gcd": gcd, "sort": sort, "chain": chain}
SLIP_FAMILIES = ("arith", "chain")  # take `slip=`: their solutions can carry slipped intermediate results


def parse_families(spec: str) -> list[str]:
    names = [f.strip() for f in spec.split(",") if f.strip()]
    for n in names:
        if n not in FAMILIES:
            raise ValueError(f"unknown task family {n!r}; allowed: {sorted(FAMILIES)}")
    return names


def _stream(families: list[str], min_d: int, max_d: int, seed: int, stream: int,
            error_rate: float = 0.0) -> Iterator[Problem]:
    rng = np.random.default_rng([seed, stream])
    slip = {"slip": slips(np.random.default_rng([seed, stream, 1]), error_rate)} if error_rate else {}
    while True:
        fam = families[int(rng.integers(len(families)))]
        yield FAMILIES[fam](rng, int(rng.integers(min_d, max_d + 1)), **(slip if fam in SLIP_FAMILIES else {}))


def make_splits(families: list[str], min_difficulty: int, max_difficulty: int, train_size: int,
                eval_size: int, seed: int, error_rate: float = 0.0) -> tuple[list[Problem], list[Problem]]:
    """Deterministic train / eval splits; no eval problem text appears in train, none repeats in eval.
    error_rate > 0: the solutions of SLIP_FAMILIES slip (module docstring); the others' stay exact."""
    evals, seen, misses = [], set(), 0
    # A small space (e.g. one family at difficulty 1) runs out of unique problems: stop after 10k misses.
    for p in _stream(families, min_difficulty, max_difficulty, seed, 1, error_rate):
        if len(evals) == eval_size or misses > 10_000:
            break
        if p.problem in seen:
            misses += 1
        else:
            seen.add(p.problem)
            evals.append(p)
            misses = 0
    train, misses = [], 0
    for p in _stream(families, min_difficulty, max_difficulty, seed, 2, error_rate):
        if len(train) == train_size or misses > 10_000:
            break
        if p.problem in seen:
            misses += 1
        else:
            train.append(p)  # train problems may repeat; only eval ones are held out
            misses = 0
    if len(evals) < eval_size or len(train) < train_size:
        raise ValueError(f"task space too small for {eval_size} unique eval + {train_size} train problems "
                         f"(families={families}, difficulty {min_difficulty}..{max_difficulty})")
    return train, evals


EXPORT_KEYS = ("problem", "answer", "solution", "verifier", "family", "difficulty")  # tsched.data.sources records


def export(out_dir: str, train: list[Problem], evals: list[Problem]) -> None:
    """Writes `out_dir/train.jsonl` and `out_dir/eval.jsonl`, one JSON object per problem."""
    os.makedirs(out_dir, exist_ok=True)
    for name, problems in (("train", train), ("eval", evals)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({k: getattr(p, k) for k in EXPORT_KEYS}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m tsched.data.tasks --export DIR [...]`: the built-in suite as JSONL, readable by the
    `jsonl` source (`data.train_files=DIR/train.jsonl`, `data.eval_files=DIR/eval.jsonl`)."""
    ap = argparse.ArgumentParser(prog="python -m tsched.data.tasks", description=main.__doc__)
    ap.add_argument("--export", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated task families")
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-difficulty", type=int, default=1)
    ap.add_argument("--max-difficulty", type=int, default=3)
    ap.add_argument("--solution-error-rate", type=float, default=0.0,
                    help="probability of a slipped intermediate result per solution step (arith, chain)")
    args = ap.parse_args(argv)
    train, evals = make_splits(parse_families(args.families), args.min_difficulty, args.max_difficulty,
                               args.train_size, args.eval_size, args.seed, args.solution_error_rate)
    export(args.export, train, evals)
    print(f"wrote {len(train)} train and {len(evals)} eval problems to {args.export}")


if __name__ == "__main__":
    main()
