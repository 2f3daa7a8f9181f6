import pytest

from warmup_distill_kedro.core.tasks import canonical_number, extract_final_answer, math_exact_match


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
