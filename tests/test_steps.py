from __future__ import annotations

import pytest

from psr_ray.core import steps


def test_header_and_join():
    assert steps.step_header(3) == "Step 3:"
    assert steps.step_continuation("  She has 5. ") == " She has 5."
    assert steps.join_steps([]) == ""
    assert steps.join_steps([" a ", "b"]) == "Step 1: a\nStep 2: b\n"
    with pytest.raises(ValueError):
        steps.step_header(0)


def test_split_round_trips_join():
    parts = ["Add 2 and 3 to get 5.", "Multiply by 4: $5 \\times 4 = 20$.", "The answer is \\boxed{20}."]
    assert steps.split_steps(steps.join_steps(parts)) == parts


def test_split_variants_and_preamble():
    text = "Let me think.\nStep 1. first\n**Step 2:** second\n  Step 10: tenth\nline two"
    assert steps.split_steps(text) == ["first", "second", "tenth\nline two"]


def test_split_without_markers_uses_lines():
    assert steps.split_steps("a\n\n b \n") == ["a", "b"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{ {2} }", "{2}"),
        ("\\boxed {x^{2}+1}", "x^{2}+1"),
        ("\\fbox{7}", "7"),
        ("\\boxed{unclosed", None),
        ("no answer", None),
    ],
)
def test_extract_boxed(text, expected):
    assert steps.extract_boxed(text) == expected


def test_clean_step_cuts_after_answer_and_at_stray_marker():
    assert (
        steps.clean_step(" 2+2=4, so the answer is \\boxed{4}. Then more\nnoise")
        == "2+2=4, so the answer is \\boxed{4}. Then more"
    )
    assert steps.clean_step("x = 3\nStep 4: y") == "x = 3"
    assert steps.clean_step("  plain step \n") == "plain step"


def test_final_step():
    assert steps.is_final_step("Thus \\boxed{5}")
    assert not steps.is_final_step("Thus 5")
