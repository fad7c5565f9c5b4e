"""Answer-letter extraction on a table of real-world answer styles."""

from __future__ import annotations

import pytest

from facellm_edge.evaluate.letters import extract_letter

OPTS = {"A": "Happy", "B": "Sad", "C": "Angry", "D": "Surprised"}
AGE = {"A": "0-2", "B": "20-29", "C": "30-39", "D": "more than 70"}

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
    ("The person is happy or sad.", OPTS, None),
    ("The image is blurry.", OPTS, None),
    ("E", OPTS, None),
]


@pytest.mark.parametrize("text, options, expected", CASES)
def test_extract_letter(text, options, expected):
    assert extract_letter(text, options) == expected


def test_table_is_large_enough():
    assert len(CASES) >= 25
