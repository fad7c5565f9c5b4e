"""Answer-letter extraction from free-form model output: two rule sets, chosen by name (``RULES``).

``facexbench`` (the default) behaves exactly like FaceXBench's own ``aggregate_results.py``, so scores are
comparable with the published tables: six case-sensitive label patterns tried at the start of the answer, then
anywhere (pattern by pattern, first hit that is an option label wins), then the option texts (equal, then
contained, in option order). A lowercase letter is never a label.

``robust`` is this project's own, stricter rule. Order of evidence: explicit statements ("Answer: B", "the answer is (B)", "**B**"), a leading letter ("B", "(B)",
"B) text", "B. text"), a lone option letter anywhere, then the text of exactly one option. Refusals and answers that
name several different options give ``None`` (counted as wrong, reported as unanswered).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can'?t|i cannot|i can not|i'?m unable|i am unable|"
    r"i'?m not able|unable to (determine|answer|tell|identify)|cannot (be )?determined?|as an ai)\b",
    re.IGNORECASE,
)


def _clean(text: str) -> str:
    text = re.sub(r"</?s>|<\|im_end\|>|<\|endoftext\|>", " ", text)
    text = text.replace("**", "").replace("__", "").replace("`", "")
    return text.strip()


def _lower_letter_is_label(match: re.Match, text: str) -> bool:
    """A lowercase letter counts as a label only when it is set off as one: "(a)", "[b]", "a)", "c." or "d" at
    the end. "The answer is a woman" names no option."""
    letter_at, end = match.start("l"), match.end("l")
    before = text[letter_at - 1] if letter_at else ""
    after = text[end:end + 1]
    return before in "([" and before != "" or after in (")", "]", ".", ":", ",", "") or not text[end:].strip(" .!")


# Words after a capital "A" that make it a label, not the article: "A or B", "A is right", "either A and C".
_AFTER_A_LABEL = frozenset("or and nor vs versus is was seems looks would could might may appears then because since "
                           "but fits matches".split())


def _is_article(match: re.Match, text: str) -> bool:
    """A bare capital "A" followed by a lowercase word ("A man", "A person who ...") is the article, not option A;
    "A or B" and "A is correct" name the option."""
    if match.group(0) != "A":
        return False
    word = re.match(r"\s+([a-z]+)", text[match.end():])
    return word is not None and word.group(1) not in _AFTER_A_LABEL


def _names_an_option(text: str, options: Mapping[str, str]) -> bool:
    low = text.lower()
    return any(re.search(rf"(?<!\w){re.escape(v.lower().strip(' .'))}(?!\w)", low) for v in options.values())


def extract_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The ``robust`` rule: the option letter a model's answer chooses, or None if it refuses, is ambiguous or
    chooses nothing."""
    letters = "".join(options)
    if not text or not letters:
        return None
    t = _clean(text)
    if not t:
        return None
    cls = f"[{re.escape(letters)}{re.escape(letters.lower())}]"
    L = f"(?P<l>{cls})"

    # 1. explicit: "Answer: B", "The answer is (B).", "correct option is B", "I choose B", "Option B"
    explicit = [
        rf"\b(?:final\s+)?answer\s*(?:is|:|-|=)?\s*(?:option\s*)?[\(\[]?{L}[\)\]]?(?![\w'])",
        rf"\b(?:correct|right|best)\s+(?:answer|option|choice)\s*(?:is|:|would be|=)?\s*(?:option\s*)?"
        rf"[\(\[]?{L}[\)\]]?(?![\w'])",
        rf"\b(?:i\s+(?:would\s+)?(?:choose|pick|select|go with))\s*(?:option\s*)?[\(\[]?{L}[\)\]]?(?![\w'])",
        rf"\boption\s*[\(\[]?{L}[\)\]]?(?![\w'])",
    ]
    for pat in explicit:
        m = re.search(pat, t, re.IGNORECASE)
        if m and (m.group("l").isupper() or _lower_letter_is_label(m, t)):
            return m.group("l").upper()

    # 2. leading letter: "B", "(B)", "B)", "B.", "B:", "[B]", "B - text"; "C, D" or "(B) or (D)" names two
    if re.match(rf"^[\(\[]?{cls}[\)\]]?\s*(?:,|/|&|\bor\b|\band\b)\s*[\(\[]?{cls}[\)\]]?(?![\w'])", t):
        return None
    m = re.match(rf"^[\(\[]?{L}(?:[\)\]\.:,]|\s*-|\s*$|\s+(?=[A-Z]))", t)
    # an option whose own text reads like a refusal ("Cannot determine") is an answer, not a refusal
    refuses = bool(_REFUSAL.search(t)) and not _names_an_option(t, options)
    if m and (m.group("l").isupper() or len(t) <= 3 or re.match(rf"^[\(\[]?{cls}[\)\]\.:]", t)):
        if not refuses:
            return m.group("l").upper()

    if refuses:
        return None

    # 3. a lone capital option letter somewhere ("I think it's B", "It is C because ...")
    found = {m.group(1) for m in re.finditer(rf"(?<![\w'])[\(\[]?([{re.escape(letters)}])[\)\]]?(?![\w'])", t)
             if not _is_article(m, t)}
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None

    # 4. the text of exactly one option
    low = t.lower().strip(" .!")
    exact = [k for k, v in options.items() if v.lower().strip(" .") == low]
    if len(exact) == 1:
        return exact[0]
    hits = [k for k, v in options.items()
            if re.search(rf"(?<!\w){re.escape(v.lower().strip(' .'))}(?!\w)", low)]
    if len(hits) > 1:  # drop options contained in a longer matching one ("20-29" vs "20-29 years old")
        hits = [k for k in hits if not any(k != o and options[k].lower() in options[o].lower() for o in hits)]
    return hits[0] if len(hits) == 1 else None


# FaceXBench's label patterns, in its order. Each is tried with re.match at the start of the answer first; then each
# in turn with re.findall over the whole answer. Case-sensitive: only capital option labels count.
_FACEXBENCH_PATTERNS = tuple(re.compile(p) for p in (
    r"\b\(?([A-Za-z])\)?\b",  # "A", "(A)"
    r"\bOption\s+([A-Za-z])\b",  # "Option A"
    r"\b([A-Za-z])\.",  # "A."
    r"\b([A-Za-z]):",  # "A:"
    r"\b([A-Za-z])\s+-",  # "A -"
    r"\b\(([A-Za-z])\)",  # "(A)"
))


def extract_letter_facexbench(text: str, options: Mapping[str, str]) -> str | None:
    """FaceXBench's ``extract_option_label`` rule (see the module docstring); ``options`` in label order."""
    labels = list(options)
    answer = text.strip()
    for pattern in _FACEXBENCH_PATTERNS:
        m = pattern.match(answer)
        if m and m.group(1) in labels:
            return m.group(1)
    for pattern in _FACEXBENCH_PATTERNS:
        for label in pattern.findall(answer):
            if label in labels:
                return label
    for label, option in options.items():
        option = str(option).strip()
        if option == answer or option in answer:
            return label
    return None


Extractor = Callable[[str, Mapping[str, str]], "str | None"]
RULES: dict[str, Extractor] = {
    "facexbench": extract_letter_facexbench,  # FaceXBench's aggregate_results.py: comparable with published tables
    "robust": extract_letter,  # this project's rule: explicit statements first, refusals and ambiguity -> None
}
DEFAULT_RULES = "facexbench"


def get_rules(name: str) -> Extractor:
    from facellm_edge.errors import UsageError

    try:
        return RULES[name]
    except KeyError:
        raise UsageError(f"unknown --letter-rules {name!r}; choose from {', '.join(RULES)}") from None
