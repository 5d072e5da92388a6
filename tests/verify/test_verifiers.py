"""Answer extraction and checking, including equivalent math forms."""

from fractions import Fraction

import pytest

from tsched.verify.verifiers import VERIFIERS, extract_choice, extract_math, extract_tagged, parse_number, split_list


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
    ("Answer: twelve", "12", 0.0), ("Answer: 2, 5", "25", 0.0), ("Answer: 25", "2, 5", 0.0),
    ("Answer: 12,34", "1234", 0.0), ("Answer: 1 000", "1000", 0.0),
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
    ("Answer: C", 0.0), ("Bob", 0.0), ("Answer: I think it is B", 1.0), ("Answer: I think it is B.", 1.0),
    ("The answer is A because B is wrong", 0.0), ("Answer: **B**", 1.0), (r"\boxed{\text{B}}", 1.0),
    ("The answer is (B). Let me double-check the answer.", 1.0), ("I answered A. Answer: B", 1.0),
])
def test_choice(completion, reward):
    assert VERIFIERS["choice"](completion, "B")[0] == reward


@pytest.mark.parametrize("text,want", [
    ("Answer: I think it is B", "B"), ("Answer: I think so", None), ("Answer: I", "I"), ("Answer: I.", "I"),
    ("Answer: A or B?", "B"), ("Answer: (C), not (D)", "C"), ("Answer: Bob", None), ("answer is E)", "E"),
    ("Answers vary. (D)", "D"), ("answer: J\n", "J"), ("the answer is K.", None),
    ("**Answer:** B", "B"), ("**Answer: C**", "C"), ("Answer: $D$", "D"), ("Answer: **I** think", "I"),
])
def test_extract_choice_needs_a_standalone_letter(text, want):
    assert extract_choice(text) == want


@pytest.mark.parametrize("s,want", [
    ("1,234,567", 1234567), ("1,000", 1000), ("-1,000.5", "-2001/2"), ("1{,}000", 1000), ("1\\,000", 1000),
    ("10,\\!080", 10080), ("12", 12), (" 0.5 ", "1/2"), ("1 / 2", "1/2"), (".25", "1/4"),
    ("12,34", None), ("2, 5", None), ("1,2345", None), ("1,234,56", None), ("1 000", None), ("1,000\\,000", None),
    ("1/0", None), ("9" * 65, None), ("x", None), ("", None),
])
def test_parse_number_accepts_only_valid_groupings(s, want):
    assert parse_number(s) == (None if want is None else Fraction(want))


@pytest.mark.parametrize("s,want", [
    ("1, 2, 3", ["1", "2", "3"]), ("1,2,3", ["1", "2", "3"]), ("12,34", ["12", "34"]), ("2, 5", ["2", "5"]),
    ("1,234,567", ["1234567"]), ("1,234,56", ["1", "234", "56"]), ("1,000, 2,000", ["1000", "2000"]),
    ("x=1,000", ["x=1000"]), ("1234,567", ["1234", "567"]), ("0.5,000", ["0.5", "000"]),
    ("(1,2), (3,4)", ["(1,2)", "(3,4)"]), ("[1,\\infty)", ["[1,\\infty)"]), ("\\{1,2\\}", ["\\{1,2\\}"]),
    ("1{,}000", ["1{,}000"]), ("1\\,000", ["1\\,000"]), ("x", ["x"]),
])
def test_split_list(s, want):
    assert split_list(s) == want


def test_exact_normalises_whitespace():
    assert VERIFIERS["exact"]("Answer:  1  2 3", "1 2 3") == (1.0, "ok")
    assert VERIFIERS["exact"]("Answer: 1 3 2", "1 2 3") == (0.0, "wrong")
    assert VERIFIERS["exact"]("nothing", "1") == (0.0, "no_answer")


# Hidden-case kinds of math grading, each with the reward a careful human grader gives.
MATH_CASES = {
    "list same order": (r"\boxed{1,2,3}", "1, 2, 3", 1.0),
    "list spaced": (r"\boxed{1, 2, 3}", "1,2,3", 1.0),
    "list other order": (r"\boxed{3, 2, 1}", "1, 2, 3", 0.0),
    "list missing item": (r"\boxed{1, 2}", "1, 2, 3", 0.0),
    "list repeated item": (r"\boxed{1, 1, 2}", "1, 2", 0.0),
    "list vs number": (r"\boxed{25}", "2, 5", 0.0),
    "number vs list": (r"\boxed{2, 5}", "25", 0.0),
    "bad grouping is a list": (r"\boxed{12,34}", "1234", 0.0),
    "list items equivalent": (r"\boxed{\frac{1}{2}, 0.25}", "0.5, 1/4", 1.0),
    "set notation any order": (r"\boxed{\{3, 1\}}", r"\{1, 3\}", 1.0),
    "tuple order matters": (r"\boxed{(2, 1)}", "(1, 2)", 0.0),
    "tuple": (r"\boxed{(1,2)}", "(1, 2)", 1.0),
    "bare list is not a tuple": (r"\boxed{1, 2}", "(1, 2)", 0.0),
    "fraction vs slash": (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    "fraction vs decimal": (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    "dfrac": (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0),
    "frac shorthand": (r"\boxed{\frac12}", "1/2", 1.0),
    "wrong fraction": (r"\boxed{\frac{1}{3}}", "1/2", 0.0),
    "last box counts": (r"first \boxed{3}, on reflection \boxed{4}", "4", 1.0),
    "earlier box does not": (r"first \boxed{4}, on reflection \boxed{3}", "4", 0.0),
    "distractor before answer line": ("Try 5: no. Try 7: yes.\nAnswer: 7", "7", 1.0),
    "distractor number after answer": ("The answer is 7. Check: 7*2=14", "7", 1.0),
    "box beats answer line": ("\\boxed{7}\nAnswer: 8", "7", 1.0),
    "gsm8k marker": ("3+4=7\n#### 7", "7", 1.0),
    "equation in box": (r"\boxed{x = 3}", "3", 1.0),
    "equation wrong value": (r"\boxed{x = 4}", "3", 0.0),
    "units in text": (r"\boxed{12\text{ cm}}", "12", 1.0),
    "wrong value with units": (r"\boxed{13\text{ cm}}", "12", 0.0),
    "thousands separator": (r"\boxed{1,000}", "1000", 1.0),
    "thousands separator in gold": (r"\boxed{1000}", "1,000", 1.0),
    "millions": (r"\boxed{1,234,567}", "1234567", 1.0),
    "latex thin space grouping": (r"\boxed{1\,000}", "1000", 1.0),
    "latex brace grouping": (r"\boxed{1{,}000}", "1000", 1.0),
    "MATH kerned grouping in gold": (r"\boxed{10080}", r"10,\!080", 1.0),
    "MATH kerned grouping in answer": (r"\boxed{1,\!000,\!000}", "1000000", 1.0),
    "kerned grouping, wrong value": (r"\boxed{10,\!081}", r"10,\!080", 0.0),
    "spaces do not group": (r"\boxed{1 000}", "1000", 0.0),
    "spaced digits are not a sum": (r"\boxed{7}", "2 5", 0.0),
    "grouped equation": (r"\boxed{x = 1,000}", "1000", 1.0),
    "negative": (r"\boxed{-5}", "-5", 1.0),
    "sign matters": (r"\boxed{5}", "-5", 0.0),
    "negative fraction": (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    "sqrt": (r"\boxed{\sqrt{2}}", r"\sqrt 2", 1.0),
    "sqrt simplified": (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    "sqrt is not its decimal": (r"\boxed{1.414}", r"\sqrt{2}", 0.0),
    "pi": (r"\boxed{2\pi}", r"2\pi", 1.0),
    "pi is not 3.14": (r"\boxed{3.14}", r"\pi", 0.0),
    "closed interval": (r"\boxed{[1, 3]}", "[1,3]", 1.0),
    "half-open interval": (r"\boxed{[1, \infty)}", r"[1,\infty)", 1.0),
    "interval ends matter": (r"\boxed{(1, 3]}", "[1,3]", 0.0),
    "percent vs fraction": (r"\boxed{50\%}", "0.5", 1.0),
    "percent vs number": (r"\boxed{50\%}", "50", 1.0),
    "wrong percent": (r"\boxed{40\%}", "50", 0.0),
    "degrees": (r"\boxed{30^\circ}", "30", 1.0),
    "dollars": (r"\boxed{\$18.90}", "18.9", 1.0),
    "text answer": (r"\boxed{\text{Devon}}", "Devon", 1.0),
    "expanded polynomial": (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    "trailing period": ("Answer: 42.", "42", 1.0),
    "dollars and period": ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
    "answer is, lower case": ("so the answer is 9", "9", 1.0),
    "markdown bold label": ("**Final Answer:** 42", "42", 1.0),
    "markdown bold answer": ("Answer: **$\\frac{3}{4}$.**", "0.75", 1.0),
    "no answer": ("I am not sure.", "3", 0.0),
    "empty box": (r"\boxed{}", "3", 0.0),
}


@pytest.mark.parametrize("completion,answer,reward", MATH_CASES.values(), ids=MATH_CASES.keys())
def test_math_hidden_cases(completion, answer, reward):
    assert VERIFIERS["math"](completion, answer)[0] == reward


@pytest.mark.parametrize("completion,answer,reward", [
    (r"\boxed{3, -2}", "-2, 3", 1.0), (r"\boxed{-2, 3}", "-2, 3", 1.0), (r"\boxed{3, 3}", "3", 0.0),
    (r"\boxed{3, 3}", "3, -2", 0.0), (r"\boxed{\frac{1}{2}, 2}", "2, 0.5", 1.0), (r"\boxed{25}", "2, 5", 0.0),
])
def test_math_unordered_compares_lists_as_multisets(completion, answer, reward):
    assert VERIFIERS["math_unordered"](completion, answer)[0] == reward


def test_math_statuses():
    assert VERIFIERS["math"]("no answer", "3") == (0.0, "no_answer")
    assert VERIFIERS["math"](r"\boxed{3}", "3") == (1.0, "ok")
    assert VERIFIERS["math"](r"\boxed{4}", "3") == (0.0, "wrong")
