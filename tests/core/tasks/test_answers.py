import pytest

from warmup_distill_kedro.core.tasks import (
    canonical_number,
    extract_final_answer,
    extract_last_number,
    math_exact_match,
    math_flexible_match,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 7 = 12. 12 - 3 = 9. #### 9", "9"),
        ("#### 1,000", "1000"),
        ("#### 1,234,567.50", "1234567.5"),
        ("#### 9.0", "9"),
        ("#### +9", "9"),
        ("#### -3", "-3"),
        ("####-3", "-3"),
        ("#### $5", "5"),
        ("#### -$5", "-5"),
        ("#### 007", "7"),
        ("#### -0", "0"),
        ("#### 0.50", "0.5"),
        ("#### .5", "0.5"),
        ("#### 18 apples", "18"),
        ("#### 18.", "18"),
        ("#### 12\n\nsome trailing text", "12"),
        ("first #### 3 then #### 4", "4"),
        ("She has 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ],
)
def test_extract_final_answer_reads_the_last_number(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text", ["5 + 7 = 12", "", "#### ", "#### apples", "##### x", "### 9", "#### 9 #### none"]
)
def test_extract_final_answer_none_without_a_number_after_the_marker(text):
    assert extract_final_answer(text) is None


def test_canonical_number_handles_plain_numbers_and_rejects_text():
    assert canonical_number(" 42 ") == "42"
    assert canonical_number("1,000") == "1000"
    assert canonical_number("2.500") == "2.5"
    assert canonical_number("100") == "100"  # no exponent form
    assert canonical_number("abc") is None


def test_math_exact_match():
    assert math_exact_match("3 + 6 = 9. #### 9", "9")
    assert math_exact_match("#### 1000", "1,000")
    assert math_exact_match("#### 9.00", "9")
    assert math_exact_match("#### 9", "blah #### 9")  # a full gold response works as well
    assert not math_exact_match("#### 19", "9")
    assert not math_exact_match("#### -9", "9")
    assert not math_exact_match("the answer is 9", "9")  # no marker, no match
    assert not math_exact_match("#### 9", "nine")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 clips in April and 24 in May, so she sold 72 clips. The answer is 72.", "72"),
        ("The total is $1,250.", "1250"),
        ("She has 2.50 left", "2.5"),
        ("It drops to -3 degrees", "-3"),
        ("2 + 3 = 5<|im_end|>", "5"),
        ("3 + 6 = 9\n#### 9", "9"),
        ("no number at all", None),
        ("", None),
    ],
)
def test_extract_last_number_reads_the_last_number_anywhere(text, expected):
    assert extract_last_number(text) == expected


def test_flexible_and_strict_matches_differ_where_lm_eval_harness_says():
    prose = "48 / 2 = 24 clips in May. 48 + 24 = 72. The answer is 72."
    assert math_flexible_match(prose, "72") and not math_exact_match(prose, "72")
    # A right `####` line followed by more text: strict credits it, flexible reads the last number.
    trailing = "#### 72\nThat took 3 steps."
    assert math_exact_match(trailing, "72") and not math_flexible_match(trailing, "72")
    assert math_flexible_match("#### 1,000", "blah #### 1000")
    assert not math_flexible_match("The answer is 71.", "72")
    assert not math_flexible_match("The answer is seventy-two.", "72")
