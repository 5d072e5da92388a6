"""Answer extraction and checking, registered by name. Pure functions of text: no eval / exec, ever.

Each verifier is `check(completion, answer) -> (reward, status)` with status in
`ok | wrong | no_answer`; anything it raises becomes `error` in the pool. They run inside the worker
processes of `tsched.verify.pool`, which add the hard deadline and crash isolation; the cheap
pre-checks here keep pathological inputs from reaching the parsers at all.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

from tsched.registry import make_registry

Check = Callable[[str, str], tuple[float, str]]
VERIFIERS, register = make_registry()

MAX_ANSWER_CHARS = 200  # an extracted final answer longer than this is not an answer
MAX_NUMBER_DIGITS = 64  # bounds big-int parsing and comparison
_ANSWER_RE = re.compile(r"Answer:[ \t]*([^\n]*)")
_NUMBER_RE = re.compile(r"^[+-]?(\d{1,64}(\.\d{1,64})?|\.\d{1,64})(/\d{1,64})?$")



def extract_tagged(text: str) -> str | None:
    """The text after the last `Answer:` (to the end of that line), stripped; None if there is none."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].strip().rstrip(".").strip()
    return ans if ans and len(ans) <= MAX_ANSWER_CHARS else None


def parse_number(s: str) -> Fraction | None:
    """Integer, decimal or a/b fraction (commas as thousands separators allowed); None otherwise."""
    s = s.replace(",", "").replace(" ", "")
    if not _NUMBER_RE.match(s):
        return None
    return Fraction(s)


@register("exact")
def check_exact(completion: str, answer: str) -> tuple[float, str]:
    """Whitespace-normalised string equality of the tagged answer."""
    got = extract_tagged(completion)
    if got is None:
        return 0.0, "no_answer"
    return (1.0, "ok") if " ".join(got.split()) == " ".join(answer.split()) else (0.0, "wrong")


@register("numeric")
def check_numeric(completion: str, answer: str) -> tuple[float, str]:
    """Exact rational equality of the tagged answer (so 0.5 == 1/2 and 12 == 12.0)."""
    got = extract_tagged(completion)
    if got is None:
        return 0.0, "no_answer"
    value = parse_number(got)
    if value is None:
        return 0.0, "wrong"
    return (1.0, "ok") if value == parse_number(answer) else (0.0, "wrong")


_BOXED = "\\boxed{"
_GSM8K_RE = re.compile(r"####\s*([^\n]+)")
_RISKY_RE = re.compile(r"\d{65,}|(\^|\*\*).*(\^|\*\*)|\d{3,}\s*!")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces; None if absent, unbalanced or too long."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 1)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip() or None
    return None


def extract_math(text: str) -> str | None:
    """Final answer of a math completion: last \\boxed{}, else GSM8K `#### x`, else `Answer: x`."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    m = _GSM8K_RE.findall(text)
    if m and len(m[-1].strip()) <= MAX_ANSWER_CHARS:
        return m[-1].strip()
    return extract_tagged(text)


@register("math")
def check_math(completion: str, answer: str) -> tuple[float, str]:
    """Symbolic equivalence by math-verify (fractions, decimals, LaTeX, `x=3` vs `3`, ...)."""
    import math_verify  # imported in the worker process only

    got = extract_math(completion)
    if got is None:
        return 0.0, "no_answer"
    # Exponent towers, factorials of large numbers and giant literals can run sympy for hours or
    # exhaust memory; no answer of a real problem needs them, so they are wrong without parsing.
    if _RISKY_RE.search(got):
        return 0.0, "wrong"
    num = parse_number(got)
    if num is not None and num == parse_number(answer):
        return 1.0, "ok"
    gold = math_verify.parse(f"${answer}$", parsing_timeout=None)
    pred = math_verify.parse(f"${got}$", parsing_timeout=None)
    if not pred:
        return 0.0, "no_answer"
    return (1.0, "ok") if math_verify.verify(gold, pred, timeout_seconds=None) else (0.0, "wrong")


_CHOICE_RES = (re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
               re.compile(r"[Aa]nswer(?: is)?:?\s*\(?([A-J])\)?(?![A-Za-z])"),
               re.compile(r"\(([A-J])\)"))


@register("choice")
def check_choice(completion: str, answer: str) -> tuple[float, str]:
    """Multiple choice: the letter in \\boxed{B}, `Answer: B` / `answer is (B)`, or the last `(B)`."""
    for pattern in _CHOICE_RES:
        found = pattern.findall(completion)
        if found:
            return (1.0, "ok") if found[-1] == answer.strip().strip("()").upper() else (0.0, "wrong")
    return 0.0, "no_answer"
