"""Answer-letter extraction on a table of real-world answer styles."""

from __future__ import annotations

import pytest

from facellm_edge.errors import UsageError
from facellm_edge.eval.letters import DEFAULT_RULES, extract_letter, extract_letter_facexbench, get_rules

OPTS = {"A": "Happy", "B": "Sad", "C": "Angry", "D": "Surprised"}
AGE = {"A": "0-2", "B": "20-29", "C": "30-39", "D": "more than 70"}
CANNOT = {"A": "Yes", "B": "No", "C": "Cannot determine", "D": "Both"}

CASES = [
    ("B", OPTS, "B"),
    ("b", OPTS, "B"),
    ("(B)", OPTS, "B"),
    ("[C]", OPTS, "C"),
    ("B)", OPTS, "B"),
    ("B.", OPTS, "B"),
    ("B. Sad", OPTS, "B"),
    ("B) Sad", OPTS, "B"),
    ("B: Sad", OPTS, "B"),
    ("C - Angry", OPTS, "C"),
    ("Answer: B", OPTS, "B"),
    ("answer: d", OPTS, "D"),
    ("The answer is B.", OPTS, "B"),
    ("The correct answer is (C) Angry.", OPTS, "C"),
    ("The best option is D", OPTS, "D"),
    ("**B**", OPTS, "B"),
    ("**Answer:** C", OPTS, "C"),
    ("Final answer: A", OPTS, "A"),
    ("I would choose option D because the eyes are wide open.", OPTS, "D"),
    ("Option C", OPTS, "C"),
    ("I think it's B.", OPTS, "B"),
    ("Sad", OPTS, "B"),
    ("sad.", OPTS, "B"),
    ("The person looks surprised.", OPTS, "D"),
    ("A", OPTS, "A"),
    ("A. Happy", OPTS, "A"),
    ("A man with a neutral face; the answer is C", OPTS, "C"),
    ("A person who is clearly angry.", OPTS, "C"),
    ("20-29", AGE, "B"),
    ("The person appears to be more than 70 years old.", AGE, "D"),
    ("B<|im_end|>", OPTS, "B"),
    ("  \n(D)\n", OPTS, "D"),
    ("I'm sorry, but I can't determine emotions from this image.", OPTS, None),
    ("I cannot answer that.", OPTS, None),
    ("As an AI, I cannot identify people.", OPTS, None),
    ("", OPTS, None),
    ("It could be B or C.", OPTS, None),
    # several options named are no answer, wherever they stand (an "A" before "or" is the option, not the article)
    ("A or B", OPTS, None),
    ("It is either A or C", OPTS, None),
    ("C, D", OPTS, None),
    ("(B) or (D)", OPTS, None),
    ("A/B", OPTS, None),
    ("A is correct", OPTS, "A"),
    ("A, because of the smile", OPTS, "A"),
    ("The person is happy or sad.", OPTS, None),
    ("The image is blurry.", OPTS, None),
    ("E", OPTS, None),
    # a lowercase article after "the answer is" names no option; the option text decides
    ("The answer is a woman aged 20-29", AGE, "B"),
    ("The answer is a person in their 30-39 range", AGE, "C"),
    ("answer: (a)", OPTS, "A"),
    # an option whose text reads like a refusal is an answer, not a refusal
    ("Cannot determine", CANNOT, "C"),
    ("C. Cannot determine", CANNOT, "C"),
    ("It cannot be determined from this image.", OPTS, None),
]


@pytest.mark.parametrize("text, options, expected", CASES)
def test_extract_letter(text, options, expected):
    assert extract_letter(text, options) == expected


def test_table_is_large_enough():
    assert len(CASES) >= 25


# FaceXBench's aggregate_results.py rule, case by case (what it returns, including its quirks: a capital "A" article
# counts, lowercase letters never do, the first option whose text occurs in the answer wins).
FACEXBENCH_CASES = [
    ("B", OPTS, "B"),
    ("(C)", OPTS, "C"),
    ("D. Surprised", OPTS, "D"),
    ("Option B", OPTS, "B"),
    ("b", OPTS, None),  # lowercase is never a label
    ("The answer is B.", OPTS, "B"),  # found by the whole-text search
    ("A man who looks sad", OPTS, "A"),  # its quirk: the article "A" is a label
    ("The answer is a woman aged 30-39", AGE, "C"),  # no capital label -> option text
    ("The answer is a woman aged 20-29", AGE, "A"),  # its quirk: option A's "0-2" occurs inside "20-29"
    ("Sad", OPTS, "B"),
    ("They look happy", OPTS, None),  # option texts match case-sensitively
    ("Cannot determine", CANNOT, "C"),
    ("I think it is E", OPTS, None),
    ("The image is blurry.", OPTS, None),
    ("", OPTS, None),
]


@pytest.mark.parametrize("text, options, expected", FACEXBENCH_CASES)
def test_extract_letter_facexbench(text, options, expected):
    assert extract_letter_facexbench(text, options) == expected


def test_rules_by_name():
    assert DEFAULT_RULES == "facexbench" and get_rules("facexbench") is extract_letter_facexbench
    assert get_rules("robust") is extract_letter
    with pytest.raises(UsageError, match="unknown --letter-rules 'lax'; choose from facexbench, robust"):
        get_rules("lax")
