"""Final answers of GSM8K-style responses: `... #### 42`.

`extract_final_answer` reads the number after the last `####` and writes it in one canonical form, so
that gold answers from real GSM8K files (`#### 1,000`, `#### $5`, `#### 18.00`) and model outputs
(`#### 9 apples`, `#### +9`) compare as strings.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

FINAL_ANSWER_MARKER = "####"

# At the start: optional sign and `$` (in either order), digits with optional thousands commas, decimals.
# Anything after the number is ignored.
_NUMBER = re.compile(r"([-+\u2212])?\s*\$?\s*([-+\u2212])?\s*(\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)")


def canonical_number(text: str) -> str | None:
    """A number in canonical form, or None when `text` does not start with one.

    Leading whitespace, `$` and a sign are allowed; thousands commas are removed; trailing text is ignored.
    Integers lose leading zeros and a zero fraction ("9.0" -> "9", "+9" -> "9", "007" -> "7", "-0" -> "0");
    other decimals lose trailing zeros ("2.50" -> "2.5"); negatives keep their sign ("-3").
    """
    if not isinstance(text, str):
        return None
    match = _NUMBER.match(text.strip())
    if match is None:
        return None
    sign = match.group(1) or match.group(2) or ""
    try:
        value = Decimal(match.group(3).replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
        return None
    if sign in ("-", "\u2212"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


canonicalize_number = canonical_number


def extract_final_answer(text: str) -> str | None:
    """The canonical number right after the last `####` in `text`, or None when there is none."""
    if not isinstance(text, str):
        return None
    position = text.rfind(FINAL_ANSWER_MARKER)
    if position < 0:
        return None
    return canonical_number(text[position + len(FINAL_ANSWER_MARKER) :])


def math_exact_match(prediction: str, gold_answer: str) -> bool:
    """Whether the prediction's final answer (after its last `####`) equals the gold answer.

    `gold_answer` is the table's `answer` column (a bare number such as "9" or "1,000"); a full gold
    response containing `####` is accepted too. A prediction without `#### N` never matches.
    """
    predicted = extract_final_answer(prediction)
    if predicted is None:
        return False
    gold_text = str(gold_answer)
    gold = (
        extract_final_answer(gold_text) if FINAL_ANSWER_MARKER in gold_text else canonical_number(gold_text)
    )
    return gold is not None and predicted == gold
