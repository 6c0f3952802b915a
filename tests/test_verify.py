"""Answer extraction and equivalence, with gold answers taken from the benchmark files."""

from __future__ import annotations

import threading

import pytest

from psr_ray.core.verify import extract_answer, is_equivalent
from psr_ray.data.problems import load_benchmark


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18, so \\boxed{18}.", "18"),
        ("Step 1: \\boxed{1} is wrong\nStep 2: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("unclosed \\boxed{5 then The answer is 7.", "7"),
        ("So the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: **42**", "42"),
        ("The answer is 41.\nLater: the answer is 42.", "42"),
        ("Step 1: She earns 1,200 dollars a month.\nStep 2: then 3", "3"),
        ("Step 1: She earns 1,200 dollars a month.", "1200"),
        ("Step 1: think\nStep 2:", None),
        ("no numbers here", None),
        ("\\boxed{} and 12", "12"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("18.0", "18"),
        ("1,000", "1000"),
        ("$18", "18"),
        ("\\$18.00", "18"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "0.5"),
        ("1/2", "\\frac12"),
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("a/b", "\\frac{a}{b}"),
        ("[1,2)", "[1, 2)"),
        ("5", "5 \\text{ cm}"),
        ("5 \\text{ cm}", "5"),
        ("30", "30^\\circ"),
        ("10", "10\\%"),
        ("0.1", "10\\%"),
        ("x=5", "5"),
        ("(x+1)^2", "x^2+2x+1"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ],
)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("17", "18"),
        ("18.5", "18"),
        ("(1,2]", "[1,2)"),
        ("b/a", "\\frac{a}{b}"),
        ("-1+\\sqrt{3}i", "$-1-\\sqrt{3}i$"),
        ("\\frac{1}{3}", "0.333"),
        ("\\frac{1}{2", "0.5"),  # malformed LaTeX is never equal, even where a lenient parser would guess
        ("\\sqrt{", "2"),
        ("}{", "1"),
        ("", "1"),
        (None, "1"),
        ("1", None),
    ],
)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


def test_overlong_answers_skip_the_symbolic_path():
    assert not is_equivalent("\\frac{1}{2}+" + "0+" * 250 + "0", "0.5")
    assert is_equivalent("x" * 500, "x" * 500)  # identical strings still match


@pytest.mark.parametrize(
    ("benchmark", "index", "right", "wrong"),
    [
        ("gsm8k", 0, "18", "16"),  # Janet's ducks
        ("math500", 0, "(3, \\frac{\\pi}{2})", "(3, \\pi)"),
        ("math500", 4, "Evelyn", "Bob"),  # gold \text{Evelyn}
        ("math500", 7, "90", "45^\\circ"),  # gold 90^\circ
        ("gaokao2023en", 2, "-1", "1"),
        ("gaokao2023en", 9, "\\{5, 3, 2\\}", "\\{2, 3\\}"),  # gold $\{2,3,5\}$
        ("gaokao2023en", 10, "1-i", "1+i"),
        ("gaokao2023en", 11, "\\frac{1}{\\sqrt{17}}", "\\sqrt{17}"),  # gold $\frac{\sqrt{17}}{17}$
        ("minerva_math", 0, "1.6 \\text{ cm}", "16"),
        ("svamp", 0, "145", "144"),
    ],
)
def test_benchmark_gold_answers(benchmark, index, right, wrong):
    gold = load_benchmark(benchmark, limit=index + 1).problems[index].answer
    assert is_equivalent(right, gold)
    assert not is_equivalent(wrong, gold)
    assert is_equivalent(gold, gold)


def test_works_outside_the_main_thread():
    # math-verify's default timeouts use signal.alarm, which raises outside the main thread.
    results: list[tuple[bool, bool, bool]] = []
    worker = threading.Thread(
        target=lambda: results.append(
            (is_equivalent("\\frac{1}{2}", "0.5"), is_equivalent("(x+1)^2", "x^2+2x+1"), is_equivalent("3", "4"))
        )
    )
    worker.start()
    worker.join()
    assert results == [(True, True, False)]
