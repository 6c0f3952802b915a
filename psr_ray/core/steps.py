"""The paper's step format: `Step n: ...` lines, a final answer in `\\boxed{...}`. Pure string logic."""

from __future__ import annotations

import re

# A step marker at the start of a line: "Step 3:" (also "Step 3." which small models write).
_MARKER = re.compile(r"(?m)^[ \t]*(?:\*\*)?Step[ \t]+(\d+)[ \t]*(?:\*\*)?[:.](?:\*\*)?[ \t]*")

# Generation of one step stops where the next one would begin.
STEP_STOP_STRINGS = ("\nStep ",)


def step_header(index: int) -> str:
    """The text that opens step `index` (1-based): `"Step 3:"`, no trailing space. Prompts end with it and the
    step follows as `step_continuation(step)`: BPE tokenizers attach a space to the next word (`"Step 2: She"`
    is `[..., ":", " She"]`, but `"Step 2: "` ends in a lone space token), so only this split gives the token
    ids of the solution written in one piece, which is what the engine and greedy evaluation emit."""
    if index < 1:
        raise ValueError(f"step index is 1-based, got {index}")
    return f"Step {index}:"


def step_continuation(step: str) -> str:
    """What follows a step header in free text: a space, then the step (`" She sold 48 clips."`)."""
    return " " + step.strip()


def join_steps(steps: list[str] | tuple[str, ...]) -> str:
    """`["a", "b"]` -> `"Step 1: a\\nStep 2: b\\n"` (empty string for no steps)."""
    return "".join(f"{step_header(i + 1)}{step_continuation(s)}\n" for i, s in enumerate(steps))


def split_steps(text: str) -> list[str]:
    """Step contents in order, markers removed. Text before the first marker is dropped unless there is
    no marker at all, in which case non-empty lines become steps (a solution written without markers)."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return [line.strip() for line in text.splitlines() if line.strip()]
    bounds = [m.end() for m in matches] + [len(text)]
    starts = [m.start() for m in matches[1:]] + [len(text)]
    return [text[bounds[i] : starts[i]].strip() for i in range(len(matches))]


def clean_step(text: str) -> str:
    """One generated step, trimmed: cut at a stray next-step marker and right after a closed final answer."""
    match = _MARKER.search(text)
    if match and match.start() > 0:
        text = text[: match.start()]
    end = _boxed_end(text)
    if end is not None:
        # Keep the rest of the sentence the answer closes ("... is \\boxed{4}.") but nothing after it.
        tail = re.match(r"[^\n]*", text[end:])
        text = text[: end + (tail.end() if tail else 0)]
    return text.strip()


def _find_boxed(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every balanced `\\boxed{...}` / `\\fbox{...}`; unclosed ones are skipped."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((match.start(), i, text[match.end() : i - 1]))
    return found


def _boxed_end(text: str) -> int | None:
    found = _find_boxed(text)
    return found[0][1] if found else None


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (nested braces kept), or None."""
    found = _find_boxed(text)
    return found[-1][2].strip() if found else None


def is_final_step(step: str) -> bool:
    """A step that states a final answer ends the solution."""
    return extract_boxed(step) is not None
