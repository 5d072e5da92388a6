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
# Thousands grouping: 1-3 leading digits, then groups of exactly 3, one separator kind throughout
# (`,`, or LaTeX `{,}` / `\,` / `,\!` as in the MATH dataset's `10,\!080`). Anything else with a
# comma (`12,34`, `2, 5`) is not one number.
_GROUPED = r"\d{1,3}(?:(,\\!|,|\{,\}|\\,)\d{3})(?:\1\d{3})*"
_NUMBER_RE = re.compile(rf"[+-]?(?:(?:{_GROUPED}|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_LATEX_GROUPED_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(\{,\}|\\,)\d{3})(?:\1\d{3})*(?!\d)")


def extract_tagged(text: str) -> str | None:
    """The text after the last `Answer:` (to the end of that line), stripped; None if there is none."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].strip().rstrip(".").strip()
    return ans if ans and len(ans) <= MAX_ANSWER_CHARS else None


def parse_number(s: str) -> Fraction | None:
    """Integer, decimal or a/b fraction; None otherwise (a list like `2, 5` or `12,34` included).

    Thousands separators count only in valid groupings (`1,234,567`, LaTeX `1{,}000` / `1\\,000` /
    `1,\\!000`); spaces never group digits (`1 000` is not a number here).
    """
    s = s.strip()
    if not _NUMBER_RE.fullmatch(s):
        return None
    s = re.sub(r",\\!|\{,\}|\\,|,|\s", "", s)
    if sum(c.isdigit() for c in s) > MAX_NUMBER_DIGITS or re.search(r"/0+$", s):
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
_FINAL_RE = re.compile(r"\b(?:answer:|answer is:?)[ \t]*([^\n]*)", re.IGNORECASE)
_RISKY_RE = re.compile(r"\d{65,}|(\^|\*\*).*(\^|\*\*)|\d{3,}\s*!")
MAX_LIST_ITEMS = 32  # a longer comma list is not one final answer; bounds the math-verify calls per check


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


def _clean(ans: str) -> str | None:
    """The answer sentence only (up to `. `), without `$...$`, `**` and the trailing period; None if
    empty or too long."""
    ans = re.split(r"\.\s", ans, maxsplit=1)[0]
    ans = re.sub(r"^[\s*$]+|[\s*$.]+$", "", ans)  # markdown bold, $...$, the sentence's period
    return ans if ans and len(ans) <= MAX_ANSWER_CHARS else None


def extract_math(text: str) -> str | None:
    """Final answer of a math completion: the last \\boxed{}, else the last GSM8K `#### x`, else the
    last `Answer: x` / `answer is x` (case-insensitive). The kinds are tried in that order, so an
    earlier box beats a later `Answer:` line."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_GSM8K_RE, _FINAL_RE):
        found = pattern.findall(text)
        if found:
            return _clean(found[-1])
    return None


def split_list(s: str) -> list[str]:
    """Items of a top-level comma list: `1, 2, 3` -> ['1', '2', '3']; one item if there is no list.

    Commas inside (), [], {} do not split (tuples, intervals, sets, `{,}` stay one item for
    math-verify), nor LaTeX `\\,`. A tight comma run forming a valid thousands grouping is one number
    (`1,234,567` -> '1234567', `x=1,000` -> 'x=1000'); any other (`12,34`, `2,5`) is a list.
    """
    s = re.sub(r"(?<=\d),\\!(?=\d)", ",", s)  # MATH's `10,\!080`: the `\!` only kerns the comma
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0 and s[i - 1:i] != "\\":
            pieces.append(s[start:i])
            start = i + 1
    pieces.append(s[start:])
    items, k = [], 0
    while k < len(pieces):
        m = k  # pieces[k..m] is the longest tight run that reads as digit groups
        if re.search(r"(?<![\d.])\d{1,3}$", pieces[k]):
            while (m + 1 < len(pieces) and re.match(r"\d{3}(?!\d)", pieces[m + 1])
                   and (m == k or re.fullmatch(r"\d{3}", pieces[m]))):
                m += 1
        digits_follow = m + 1 < len(pieces) and pieces[m + 1][:1].isdigit()  # `1,234,56` is no grouping
        if m > k and not digits_follow:
            items.append("".join(pieces[k:m + 1]))
            k = m + 1
        else:
            items.append(pieces[k])
            k += 1
    return [x.strip() for x in items]


def _same(got: str, gold: str) -> bool:
    """One answer item against one gold item: exact rationals first, then math-verify.

    Digits separated only by spaces (`2 5`) are ambiguous (math-verify reads `2 5` as 7), so such an
    item matches only the same text.
    """
    import math_verify  # imported in the worker process only

    got, gold = (_LATEX_GROUPED_RE.sub(lambda m: re.sub(r"\D", "", m.group()), x) for x in (got, gold))
    if any(re.fullmatch(r"[+-]?\d+(\s+\d+)+", x) for x in (got, gold)):
        return got.split() == gold.split()
    num = parse_number(got)
    if num is not None and num == parse_number(gold):
        return True
    pred = math_verify.parse(f"${got}$", parsing_timeout=None)
    return bool(pred) and math_verify.verify(math_verify.parse(f"${gold}$", parsing_timeout=None), pred,
                                             timeout_seconds=None)


def _check_math(completion: str, answer: str, ordered: bool) -> tuple[float, str]:
    got = extract_math(completion)
    if got is None:
        return 0.0, "no_answer"
    # Exponent towers, factorials of large numbers and giant literals can run sympy for hours or
    # exhaust memory; no answer of a real problem needs them, so they are wrong without parsing.
    if _RISKY_RE.search(got):
        return 0.0, "wrong"
    got_items, gold_items = split_list(got), split_list(answer.strip().strip("$"))
    if len(got_items) != len(gold_items) or len(got_items) > MAX_LIST_ITEMS or not all(got_items):
        return 0.0, "wrong"
    if ordered:
        ok = all(_same(g, a) for g, a in zip(got_items, gold_items))
    else:  # multiset match: each gold item claims one equal, still unclaimed answer item
        left = list(got_items)
        for a in gold_items:
            hit = next((g for g in left if _same(g, a)), None)
            if hit is None:
                break
            left.remove(hit)
        ok = not left
    return (1.0, "ok") if ok else (0.0, "wrong")


@register("math")
def check_math(completion: str, answer: str) -> tuple[float, str]:
    """Symbolic equivalence by math-verify (fractions, decimals, LaTeX, `x=3` vs `3`, intervals, sets,
    percentages, units in `\\text{}`); a top-level comma list (`1, 2, 3`) is an ordered list compared
    item by item, and never equals a single number (`2, 5` != `25`). Sets written as `\\{1, 2\\}`
    compare as sets (math-verify)."""
    return _check_math(completion, answer, ordered=True)


@register("math_unordered")
def check_math_unordered(completion: str, answer: str) -> tuple[float, str]:
    """`math` with top-level comma lists compared as multisets: for "enter all solutions" answers,
    where `3, -2` answers `-2, 3` (but `3, 3` does not answer `3`)."""
    return _check_math(completion, answer, ordered=False)


# The letter must be the whole answer token: in parentheses / bold / box, or followed by the end of the
# line or punctuation, never by a word (`Answer: I think it is B` reads B, not the pronoun I).
_LETTER_RE = re.compile(r"(?<![A-Za-z0-9\\])(?:\(([A-J])\)|\*\*([A-J])\*\*|([A-J])(?=\s*(?:$|[.,;:!?)*$\n])))")
_CHOICE_BOXED_RE = re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?\(?([A-J])\)?\s*\}?\s*\}")
_CHOICE_PHRASE_RE = re.compile(r"\banswer(?:\s+is)?(?![a-z])\s*:?([^\n]*)", re.IGNORECASE)
_PAREN_LETTER_RE = re.compile(r"\(([A-J])\)")


def extract_choice(text: str) -> str | None:
    """The chosen letter A-J: the last \\boxed{B}; else the first standalone letter after the last
    `answer is` / `Answer:` that has one; else the last `(B)` anywhere; None if there is none."""
    boxed = _CHOICE_BOXED_RE.findall(text)
    if boxed:
        return boxed[-1]
    for phrase in reversed(_CHOICE_PHRASE_RE.findall(text)):
        m = _LETTER_RE.search(phrase)
        if m:
            return next(g for g in m.groups() if g)
    found = _PAREN_LETTER_RE.findall(text)
    return found[-1] if found else None


@register("choice")
def check_choice(completion: str, answer: str) -> tuple[float, str]:
    """Multiple choice: the letter `extract_choice` reads against the gold letter (`B` or `(B)`)."""
    got = extract_choice(completion)
    if got is None:
        return 0.0, "no_answer"
    return (1.0, "ok") if got == answer.strip().strip("()").upper() else (0.0, "wrong")
