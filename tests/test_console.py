"""The console is for people: one line per stage, a summary per iteration, Ray's worker output in log files
whose folder is printed, and all of it back with --verbose. (tests/test_submit.py reads the console of a whole
run, as its job logs.)"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from psr_ray.runtime import console

BIN = Path(sys.executable).parent


def test_iteration_summary_names_what_the_iteration_did():
    stages = {
        "search": {"pairs_total": 12, "rollbacks": 3, "unparseable_rate": 0.25},
        "train": {"num_optimizer_steps": 6, "final": {"train/loss": 0.6931}},
        "sync": {"policy_version": 2},
        "eval": {"rows": [{"benchmark": "gsm8k", "accuracy": 0.125}, {"benchmark": "svamp", "accuracy": 0.5}]},
    }
    previous = [{"benchmark": "gsm8k", "accuracy": 0.1}]
    assert console.iteration_summary(1, 2, stages, previous) == (
        "== iteration 1/2: 12 pairs, 3 rollbacks, 25.0% unparseable; 6 steps, loss 0.6931; policy v2; "
        "gsm8k 12.5% (+2.5); svamp 50.0%"
    )
    assert (
        console.iteration_summary(0, 2, {"eval": stages["eval"]}, []) == "== starting model: gsm8k 12.5%; svamp 50.0%"
    )


def test_a_stage_off_a_terminal_is_one_line():
    out = io.StringIO()
    with console.stage("iter 1/2 sync") as display:
        display.stream = out
        display.done("policy v2")
    with pytest.raises(RuntimeError), console.stage("iter 1/2 eval") as display:
        display.stream = out
        raise RuntimeError("engine died")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"iter 1/2 sync: policy v2 \[00:0\d\]", lines[0])
    assert re.fullmatch(r"iter 1/2 eval: failed \[00:0\d\]", lines[1])


def _eval(tiny_model_dir: str, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a Ray of its own, not the session's
    result = subprocess.run(
        [str(BIN / "psr-ray"), "eval", *flags, "--model", tiny_model_dir, "--benchmarks", "gsm8k", "--limit", "2",
         "eval.max_tokens=8", "model.max_model_len=512", "rollout.num_cpus_per_engine=0.5", "run.wandb_mode=disabled"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_ray_notices_during_a_short_command_go_to_its_log_not_under_its_line(capsys, caplog):
    import logging

    from ray._private.worker import print_to_stdstream

    log = logging.getLogger("psr_ray.test_notices")
    notice = "WARNING: 4 PYTHON worker processes have been started on node"
    with caplog.at_level(logging.DEBUG, logger=log.name), console.ray_notices_to_log(log):
        # What Ray's driver-side error listener does with a raylet's notice (it goes to stdout), and a stderr line.
        print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        print("a stderr notice", file=sys.stderr)
    said = capsys.readouterr()
    # (A Ray connection left by an earlier test in this process may print its workers' lines meanwhile: those go
    # to the log too, so only these two are looked for.)
    assert notice not in said.out + said.err and "a stderr notice" not in said.out + said.err
    logged = [r.getMessage() for r in caplog.records]
    assert [m for m in logged if notice in m and "(raylet)" in m] != [] and "ray: a stderr notice" in logged


@pytest.mark.ray
def test_worker_output_goes_to_the_printed_log_folder_and_verbose_brings_it_back(tiny_model_dir):
    quiet = _eval(tiny_model_dir)
    assert "(EngineActor" not in quiet and "Initializing a V1 LLM engine" not in quiet
    (logs,) = re.findall(r"\[psr_ray\] engine, trainer and Ray Data logs: (\S+)", quiet)
    engine_logs = "".join(p.read_text(errors="replace") for p in Path(logs).glob("worker-*") if p.is_file())
    assert "Initializing a V1 LLM engine" in engine_logs  # what the console no longer shows is in those files
    assert "| gsm8k |" in quiet  # the command's own output stays
    verbose = _eval(tiny_model_dir, "--verbose")
    assert "(EngineActor" in verbose and "Initializing a V1 LLM engine" in verbose
    assert "engine, trainer and Ray Data logs" not in verbose


def test_the_model_conversion_is_one_line_and_keeps_what_stderr_got_when_it_fails(capsys, monkeypatch):
    from psr_ray.runtime import models

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with models._quiet_conversion():
        print("Converting and de-quantizing GGUF tensors...: 100%|", file=sys.stderr)
    assert capsys.readouterr().err == ""
    with pytest.raises(OSError), models._quiet_conversion():
        print("the reason, as the library said it", file=sys.stderr)
        raise OSError("disk full")
    assert capsys.readouterr().err == "the reason, as the library said it\n"
    assert "DS_ACCELERATOR" not in os.environ
