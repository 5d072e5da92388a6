"""Answer extraction and checking, including equivalent math forms."""

import pytest

from tsched.verify.verifiers import VERIFIERS, extract_math, extract_tagged


@pytest.mark.parametrize("text,want", [
    ("1+2=3. Answer: 3", "3"), ("Answer: 4\nAnswer: 5.", "5"), ("no answer here", None),
    ("Answer:   ", None), ("Answer: " + "9" * 500, None),
])
def test_extract_tagged(text, want):
    assert extract_tagged(text) == want


@pytest.mark.parametrize("text,want", [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"), (r"\boxed{a} then \boxed{b}", "b"),
    (r"\boxed{unclosed", None), ("#### 42", "42"), ("Answer: 7", "7"), ("nothing", None),
])
def test_extract_math(text, want):
    assert extract_math(text) == want


@pytest.mark.parametrize("completion,answer,reward", [
    ("Answer: 12", "12", 1.0), ("Answer: 12.0", "12", 1.0), ("Answer: 1/2", "0.5", 1.0),
    ("Answer: -17", "-17", 1.0), ("Answer: 1,000", "1000", 1.0), ("Answer: 13", "12", 0.0),
    ("Answer: twelve", "12", 0.0),
])
def test_numeric(completion, answer, reward):
    assert VERIFIERS["numeric"](completion, answer)[0] == reward


@pytest.mark.parametrize("completion,answer,reward", [
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0), (r"\boxed{\frac{1}{2}}", "0.5", 1.0), (r"\boxed{x=3}", "3", 1.0),
    ("#### 42", "42", 1.0), (r"The answer is $\boxed{\dfrac{3}{4}}$.", "0.75", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0), (r"\boxed{50\%}", "0.5", 1.0), (r"\boxed{3}", "4", 0.0),
    (r"\boxed{9^{9^{9^{9}}}}", "1", 0.0),
])
def test_math_equivalence(completion, answer, reward):
    assert VERIFIERS["math"](completion, answer)[0] == reward


@pytest.mark.parametrize("completion,reward", [
    ("Answer: B", 1.0), ("the answer is (B).", 1.0), (r"\boxed{B}", 1.0), ("I pick (A) no wait (B)", 1.0),
    ("Answer: C", 0.0), ("Bob", 0.0),
])
def test_choice(completion, reward):
    assert VERIFIERS["choice"](completion, "B")[0] == reward


def test_exact_normalises_whitespace():
    assert VERIFIERS["exact"]("Answer:  1  2 3", "1 2 3") == (1.0, "ok")
    assert VERIFIERS["exact"]("Answer: 1 3 2", "1 2 3") == (0.0, "wrong")
    assert VERIFIERS["exact"]("nothing", "1") == (0.0, "no_answer")
