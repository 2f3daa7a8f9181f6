"""Final answers of GSM8K-style responses: `... #### 42`, or, as instruct models write them, in prose.

`extract_final_answer` reads the number after the last `####` and writes it in one canonical form, so
that gold answers from real GSM8K files (`#### 1,000`, `#### $5`, `#### 18.00`) and model outputs
(`#### 9 apples`, `#### +9`) compare as strings.

Two ways of scoring a response, as lm-evaluation-harness scores GSM8K:

- strict (`math_exact_match`): the number of the `#### N` line; a response without one is wrong. What
  the models trained on this format write, and the report's headline.
- flexible (`math_flexible_match`): the last number anywhere in the response ("... so she sold 72 clips.
  The answer is 72."), the harness's `flexible-extract`. What a real instruct model gets credit for
  before it learned the `####` format.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

FINAL_ANSWER_MARKER = "####"

# lm-evaluation-harness's GSM8K `flexible-extract` pattern; its last match is the answer.
_ANY_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

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


def extract_last_number(text: str) -> str | None:
    """The last number anywhere in `text`, canonical (a trailing full stop, `$` and commas dropped), or None."""
    if not isinstance(text, str):
        return None
    matches = _ANY_NUMBER.findall(text)
    if not matches:
        return None
    last = next(group for group in matches[-1] if group)
    return canonical_number(last.rstrip(".").replace("$", ""))


def math_flexible_match(prediction: str, gold_answer: str) -> bool:
    """Whether the last number of the prediction equals the gold answer (`math_exact_match`'s `gold_answer`)."""
    predicted = extract_last_number(prediction)
    gold = _gold(gold_answer)
    return predicted is not None and gold is not None and predicted == gold


def _gold(gold_answer: str) -> str | None:
    gold_text = str(gold_answer)
    return (
        extract_final_answer(gold_text) if FINAL_ANSWER_MARKER in gold_text else canonical_number(gold_text)
    )


def math_exact_match(prediction: str, gold_answer: str) -> bool:
    """Whether the prediction's final answer (after its last `####`) equals the gold answer.

    `gold_answer` is the table's `answer` column (a bare number such as "9" or "1,000"); a full gold
    response containing `####` is accepted too. A prediction without `#### N` never matches.
    """
    predicted = extract_final_answer(prediction)
    if predicted is None:
        return False
    gold = _gold(gold_answer)
    return gold is not None and predicted == gold
