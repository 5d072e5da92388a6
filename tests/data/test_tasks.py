"""Task generators: exact answers (checked independently), determinism, difficulty, disjoint splits."""

import json
import math
import re

import numpy as np
import pytest

from tsched.data import tasks
from tsched.verify import verifiers


def independent_answer(p: tasks.Problem) -> str:
    """Recomputes the answer from the problem text alone, without the generator's code."""
    if p.family in ("arith", "mult"):
        expr = re.fullmatch(r"Compute ([0-9+\-*]+)\.", p.problem).group(1)
        if p.family == "mult":
            a, b = map(int, expr.split("*"))
            return str(a * b)
        nums = list(map(int, re.findall(r"\d+", expr)))
        ops = re.findall(r"[+-]", expr)
        return str(nums[0] + sum(n if o == "+" else -n for o, n in zip(ops, nums[1:])))
    if p.family == "chain":
        return str(sum(map(int, re.fullmatch(r"Add ([0-9+]+)\.", p.problem).group(1).split("+"))))
    if p.family == "gcd":
        a, b = map(int, re.findall(r"\d+", p.problem))
        return str(math.gcd(a, b))
    nums = list(map(int, re.findall(r"\d+", p.problem)))
    return " ".join(map(str, sorted(nums)))


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
@pytest.mark.parametrize("difficulty", [1, 2, 4, 8])
def test_answers_are_exact_and_solutions_end_with_them(family, difficulty):
    rng = np.random.default_rng(difficulty)
    for _ in range(50):
        p = tasks.FAMILIES[family](rng, difficulty)
        assert p.answer == independent_answer(p), p
        assert p.solution.endswith(tasks.ANSWER_PREFIX + p.answer)
        # the family's own verifier accepts the reference solution and rejects a wrong answer
        assert verifiers.VERIFIERS[p.verifier](p.solution, p.answer) == (1.0, "ok")
        assert verifiers.VERIFIERS[p.verifier](p.solution + "\nAnswer: 123456789", p.answer)[0] == 0.0


@pytest.mark.parametrize("family", ["arith", "chain"])
def test_every_step_of_a_running_sum_is_correct_and_uses_the_next_operand(family):
    p = tasks.FAMILIES[family](np.random.default_rng(0), 8)
    operands = re.findall(r"[+-]?\d+", p.problem)
    steps = re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)\.", p.solution)
    assert len(steps) == len(operands) - 1
    for (a, op, b, rhs), operand in zip(steps, operands[1:]):
        assert op + b == operand
        assert int(a) + (int(b) if op == "+" else -int(b)) == int(rhs)


def _steps(p: tasks.Problem):
    """(left operand, operator, right operand, written result) of each step of a running-value solution."""
    return [(int(a), op, int(b), int(rhs)) for a, op, b, rhs in re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)\.", p.solution)]


@pytest.mark.parametrize("family", tasks.SLIP_FAMILIES)
def test_slipped_solutions_carry_on_from_the_slip_and_keep_the_true_answer(family):
    rate = 0.2
    train, _ = tasks.make_splits([family], 1, 4, 400, 10, seed=3, error_rate=rate)
    slipped = total = wrong_answers = 0
    for p in train:
        assert p.answer == independent_answer(p), p  # the problem's answer is the true one
        operands = re.findall(r"[+-]?\d+", p.problem)
        steps = _steps(p)
        assert [op + str(b) for _, op, b, _ in steps] == [o if o[0] in "+-" else "+" + o for o in operands[1:]]
        prev = int(operands[0])
        for a, op, b, rhs in steps:
            assert a == prev  # each step starts from what the previous one wrote, slipped or not
            delta = rhs - (a + b if op == "+" else a - b)
            assert delta in (-1, 0, 1)
            slipped += delta != 0
            total += 1
            prev = rhs
        assert p.solution.endswith(f"{tasks.ANSWER_PREFIX}{prev}")  # the solution's own (maybe wrong) answer
        wrong = str(prev) != p.answer
        wrong_answers += wrong
        assert verifiers.VERIFIERS[p.verifier](p.solution, p.answer)[0] == (0.0 if wrong else 1.0)
    # binomial: about 1,000 steps, so the observed rate is within 0.05 of 0.2 with overwhelming probability
    assert abs(slipped / total - rate) < 0.05, slipped / total
    assert wrong_answers > 0.3 * len(train)


def test_slips_change_only_the_solutions():
    clean_train, clean_eval = tasks.make_splits(["chain", "arith"], 1, 3, 300, 20, seed=5)
    train, evals = tasks.make_splits(["chain", "arith"], 1, 3, 300, 20, seed=5, error_rate=0.1)
    for a, b in zip(clean_train + clean_eval, train + evals, strict=True):
        assert (a.problem, a.answer, a.family, a.difficulty) == (b.problem, b.answer, b.family, b.difficulty)
        if all(s == t for s, t in zip(_steps(a), _steps(b))):
            assert a.solution == b.solution
    assert sum(a.solution != b.solution for a, b in zip(clean_train, train)) > 50


def test_families_without_running_values_stay_exact():
    clean, _ = tasks.make_splits(["chain", "gcd", "sort"], 1, 3, 300, 10, seed=2)
    slipped, _ = tasks.make_splits(["chain", "gcd", "sort"], 1, 3, 300, 10, seed=2, error_rate=0.3)
    assert [p.problem for p in clean] == [p.problem for p in slipped]
    assert all(a == b for a, b in zip(clean, slipped) if a.family != "chain")
    assert sum(a != b for a, b in zip(clean, slipped) if a.family == "chain") > 30


def test_difficulty_lengthens_reasoning():
    rng = np.random.default_rng(1)
    for family in tasks.FAMILIES:
        short = np.mean([len(tasks.FAMILIES[family](rng, 1).solution) for _ in range(40)])
        long = np.mean([len(tasks.FAMILIES[family](rng, 8).solution) for _ in range(40)])
        assert long > 1.5 * short, family
    # the long-trace regime: arith at difficulty 8 writes 8 steps before its answer
    assert tasks.arith(rng, 8).solution.count("=") == 8


def test_splits_are_deterministic_and_disjoint():
    a_train, a_eval = tasks.make_splits(["arith", "sort"], 1, 3, 500, 100, seed=3)
    b_train, b_eval = tasks.make_splits(["arith", "sort"], 1, 3, 500, 100, seed=3)
    assert a_train == b_train and a_eval == b_eval
    assert len({p.problem for p in a_eval}) == 100
    assert not {p.problem for p in a_eval} & {p.problem for p in a_train}
    c_train, _ = tasks.make_splits(["arith", "sort"], 1, 3, 500, 100, seed=4)
    assert c_train != a_train
    assert {p.family for p in a_train} == {"arith", "sort"}
    assert {p.difficulty for p in a_train} == {1, 2, 3}


def test_too_small_task_space_fails_clearly():
    with pytest.raises(ValueError, match="too small"):
        tasks.make_splits(["gcd"], 1, 1, 100, 100000, seed=0)


def test_unknown_family_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed"):
        tasks.parse_families("arith,nope")


def test_export_round_trips_through_the_jsonl_source(tmp_path):
    from tsched.data import sources

    tasks.main(["--export", str(tmp_path), "--families", "arith,sort", "--train-size", "30", "--eval-size", "10",
                "--seed", "2", "--min-difficulty", "2", "--max-difficulty", "3"])
    train, evals = tasks.make_splits(["arith", "sort"], 2, 3, 30, 10, seed=2)
    for name, problems in (("train", train), ("eval", evals)):
        src = sources.open_source("jsonl", str(tmp_path / f"{name}.jsonl"))
        assert [src[i] for i in range(len(src))] == [
            {"problem": p.problem, "answer": p.answer, "solution": p.solution, "verifier": p.verifier,
             "family": p.family, "difficulty": p.difficulty} for p in problems]
    # the exported solutions still pass their family's verifier
    rec = sources.open_source("jsonl", str(tmp_path / "eval.jsonl"))[0]
    assert verifiers.VERIFIERS[rec["verifier"]](rec["solution"], rec["answer"]) == (1.0, "ok")


def test_export_command_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tsched.data.tasks", "--export", str(tmp_path / "x"),
                          "--train-size", "5", "--eval-size", "2"], capture_output=True, text=True, check=True)
    assert "wrote 5 train and 2 eval" in out.stdout
    lines = (tmp_path / "x" / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2 and list(json.loads(lines[0])) == list(tasks.EXPORT_KEYS)
