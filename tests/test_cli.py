"""How the CLI reports a failure: a user's mistake in one line, anything else as an internal error with its
traceback in a file (a ValueError raised inside an engine: tests/engines/test_engine_actor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psr_ray.app.cli import is_user_error, report_error
from psr_ray.config import UserError


def _report(err: Exception, capsys) -> list[str]:
    try:
        raise err
    except Exception as caught:  # as the CLI catches it
        assert report_error("validate", caught) == 1
    return capsys.readouterr().err.strip().splitlines()


def test_a_user_error_is_one_line_without_a_traceback_file(capsys):
    err = UserError("invalid config: trainer.num_workers must be >= 1, got 0")
    assert is_user_error(err) and isinstance(err, ValueError)
    assert _report(err, capsys) == ["psr-ray validate: invalid config: trainer.num_workers must be >= 1, got 0"]


def test_an_os_error_on_the_driver_is_a_user_error(capsys):
    err = FileNotFoundError(2, "No such file or directory", "/nope/pairs")
    assert is_user_error(err)
    assert _report(err, capsys) == ["psr-ray validate: cannot use /nope/pairs: No such file or directory"]


@pytest.mark.parametrize("err", [ValueError("got 2 judgments for 3 comparisons"), KeyError("margin")])
def test_any_other_error_is_internal_with_its_traceback_saved(err, capsys):
    assert not is_user_error(err)
    (line,) = _report(err, capsys)
    prefix = f"psr-ray validate failed: {type(err).__name__}: {str(err)} (traceback: "
    assert line.startswith(prefix) and line.endswith(".traceback)")
    saved = Path(line[len(prefix) : -1])
    try:
        text = saved.read_text()
        assert text.startswith("Traceback") and f"{type(err).__name__}: {err}" in text
    finally:
        saved.unlink()
