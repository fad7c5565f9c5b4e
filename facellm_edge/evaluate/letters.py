"""Answer-letter extraction from free-form model output.

Order of evidence: explicit statements ("Answer: B", "the answer is (B)", "**B**"), a leading letter ("B", "(B)",
"B) text", "B. text"), a lone option letter anywhere, then the text of exactly one option. Refusals and answers that
name several different options give ``None`` (counted as wrong, reported as unanswered).
"""

from __future__ import annotations

import re
from typing import Mapping

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can'?t|i cannot|i can not|i'?m unable|i am unable|"
    r"i'?m not able|unable to (determine|answer|tell|identify)|cannot (be )?determined?|as an ai)\b",
    re.IGNORECASE,
)


def _clean(text: str) -> str:
    text = re.sub(r"</?s>|<\|im_end\|>|<\|endoftext\|>", " ", text)
    text = text.replace("**", "").replace("__", "").replace("`", "")
    return text.strip()


def extract_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a model's answer chooses, or None if it refuses, is ambiguous or chooses nothing."""
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
        if m and (m.group("l").isupper() or re.search(r"answer|option|choose|pick|select", m.group(0), re.I)):
            return m.group("l").upper()

    # 2. leading letter: "B", "(B)", "B)", "B.", "B:", "[B]", "B - text"
    m = re.match(rf"^[\(\[]?{L}(?:[\)\]\.:,]|\s*-|\s*$|\s+(?=[A-Z]))", t)
    if m and (m.group("l").isupper() or len(t) <= 3 or re.match(rf"^[\(\[]?{cls}[\)\]\.:]", t)):
        if not _REFUSAL.search(t):
            return m.group("l").upper()

    if _REFUSAL.search(t):
        return None

    # 3. a lone capital option letter somewhere ("I think it's B", "It is C because ...")
    found = set(re.findall(rf"(?<![\w'])[\(\[]?([{re.escape(letters)}])[\)\]]?(?![\w'])", t))
    found.discard("A") if "A" in found and re.search(r"(?<![\w'])A\s+[a-z]", t) else None  # the article "A man"
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
