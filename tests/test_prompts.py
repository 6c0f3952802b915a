from __future__ import annotations

import math

import pytest

from psr_ray.core import prompts
from psr_ray.core.prompts import Verdict


class TemplateTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


class PlainTokenizer:
    chat_template = None


def test_solver_prompt_opens_the_next_step():
    text = prompts.render_solver_prompt(TemplateTokenizer(), " What is 2+2? ", "Step 1: add\n", 2)
    assert text.startswith("<user>Solve the following math problem step by step.")
    assert "Problem: What is 2+2?</user>" in text
    assert text.endswith("<assistant>Step 1: add\nStep 2:")


def test_solution_prompt_and_plain_fallback():
    text = prompts.render_solution_prompt(PlainTokenizer(), "Q?")
    assert text.startswith("User: Solve the following")
    assert text.endswith("Problem: Q?\n\nAssistant: Step 1:")


def test_judge_prompt_modes():
    explain = prompts.render_judge_prompt(TemplateTokenizer(), "Q", "", "a", "b", mode="explain")
    direct = prompts.render_judge_prompt(TemplateTokenizer(), "Q", "Step 1: x\n", "a", "b", mode="direct")
    assert "[Step A]\na\n\n[Step B]\nb" in explain
    assert "(none: the steps below are the first step)" in explain
    assert explain.endswith("<assistant>Explanation:")
    assert "[Previous steps]\nStep 1: x" in direct
    assert direct.endswith("<assistant>Verdict: [[")


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A is right. [[A]]", Verdict.A),
        ("Final verdict: [[ B ]]", Verdict.B),
        ("[[B]] ... so [[B]]", Verdict.B),
        ("[[A]] or maybe [[B]]", Verdict.UNPARSEABLE),
        ("Step A is better", Verdict.UNPARSEABLE),
        ("[A]", Verdict.UNPARSEABLE),
        ("", Verdict.UNPARSEABLE),
    ],
)
def test_parse_verdict_never_guesses(text, verdict):
    assert prompts.parse_verdict(text) is verdict


def test_direct_verdict_probabilities():
    verdict, p = prompts.direct_verdict(math.log(0.6), math.log(0.2))
    assert verdict is Verdict.A and p == pytest.approx(0.75)
    verdict, p = prompts.direct_verdict(None, -1.0)
    assert verdict is Verdict.B and p == 0.0
    assert prompts.direct_verdict(None, None) == (Verdict.UNPARSEABLE, 0.5)
    assert prompts.direct_verdict(-1.0, -1.0) == (Verdict.UNPARSEABLE, 0.5)
