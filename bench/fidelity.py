"""Fidelity: does process-based self-rewarding measurably improve the model? Writes bench/results/fidelity.md
and bench/results/fidelity.png, every figure computed here.

    .venv/bin/python bench/fidelity.py                  # every stage, resumable (finished stages are kept)
    .venv/bin/python bench/fidelity.py --stage init     # one stage at a time (each well under 40 min, 2 cores)

Stages (the embedded config, `--config`/overrides change it; outputs under --work):
  init     M0 -> M1 through the product (`init.run_first`'s cached init: M_ift's own candidates as EFT pairs,
           ZeRO-3 SFT on Ray Train, held-out oracle-labelled judge pairs from M1's candidates)
  self     `psr-ray run`'s loop from M1 with the configured self-judge: M2 (and M3 with --iterations 2), or
           with --self-run DIR the record of a `psr-ray run` already made with this config (e.g. `make run`'s)
  oracle   the same loop with `judge.mode: oracle` (the ablation): M2 from oracle-judged pairs
  random-self, random-oracle
           the controls, one per arm: step-DPO from M1 on that arm's own stored candidates (iteration 1) with
           random preferences, so each arm's gain is measured against a control with its candidates
  mc       the Monte-Carlo oracle (rollouts) against the exact check on stored candidates
  report   the table and the plot from the stages' records
Each model is evaluated greedily on the same `eval.limit` held-out problems (the paper's boxed rule and the
lenient one, 95% Wilson intervals, exact McNemar), its judge accuracy on the same held-out pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

from fidelity_report import CONTROLS  # bench/fidelity_report.py: the control stages and their arms

from psr_ray.runtime.memory import PeakMemory

HERE = Path(__file__).resolve().parent
STAGES = ("init", "self", "oracle", *CONTROLS, "mc", "report")


def load_cfg(args: argparse.Namespace, *extra: str) -> Any:
    from psr_ray import config as C
    from psr_ray.pipeline import preflight

    overrides = [*args.overrides, "run.wandb_mode=disabled", *extra]
    return preflight.validate(C.load(args.config or [str(C.DEFAULT_CONFIG)], overrides))


def kill_engines() -> None:
    import ray

    for name in ray.util.list_named_actors():
        if name.startswith("psr-"):
            ray.kill(ray.get_actor(name))
    deadline = time.monotonic() + 60
    while any(n.startswith("psr-") for n in ray.util.list_named_actors()) and time.monotonic() < deadline:
        time.sleep(0.2)


def record(work: Path, stage: str, value: dict[str, Any]) -> None:
    path = work / f"stage_{stage}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def recorded(work: Path, stage: str) -> dict[str, Any] | None:
    path = work / f"stage_{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def arm_folder(work: Path, arm: str) -> Path:
    """Where an arm's run is: its own folder, or the `psr-ray run` folder it was taken from (--self-run)."""
    return Path((recorded(work, arm) or {}).get("output_dir", work / arm))


def stage_init(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from psr_ray.pipeline.init_cache import init_dir, initialize_first
    from psr_ray.pipeline.session import RunSession

    cfg = load_cfg(args)
    session = RunSession(cfg)
    session.start_ray()
    start = time.perf_counter()
    with PeakMemory() as memory:
        result, m0 = initialize_first(session)
    return {"init_dir": str(init_dir(cfg)), "result": dataclasses.asdict(result), "m0": m0,
            "seconds": time.perf_counter() - start, "peak_gib": memory.peak_gib}  # fmt: skip


def stage_loop(args: argparse.Namespace, work: Path, arm: str) -> dict[str, Any]:
    """The product's loop (`psr-ray run`) from M1 with the configured judge (`self`) or the oracle."""
    from psr_ray.pipeline.loop import run
    from psr_ray.runtime.cluster import init_ray

    extra = [f"run.output_dir={work / arm}", f"run.num_iterations={args.iterations if arm == 'self' else 1}"]
    if arm == "oracle":
        extra.append("judge.mode=oracle")
    cfg = load_cfg(args, *extra)
    init_ray(cfg)
    out = work / arm  # M1's evaluation (iteration 0) is measured once per init and read back by the other arm
    resume = str(out) if (out / "state.json").is_file() else None
    start = time.perf_counter()
    with PeakMemory() as memory:
        driver = run(cfg, resume_dir=resume)
        del driver
        kill_engines()
    state = json.loads((out / "state.json").read_text())
    return {"output_dir": str(out), "state": state, "seconds": time.perf_counter() - start,
            "peak_gib": memory.peak_gib, "judge_mode": str(cfg.judge.mode)}  # fmt: skip


def stage_self_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The self arm taken from a `psr-ray run` output folder made with this bench's config (only where the
    run writes, its name and wandb may differ), instead of running the same loop again."""
    from psr_ray.pipeline.run_dir import check_resume, stored_config

    folder = Path(args.self_run).expanduser().resolve()
    if not (folder / "state.json").is_file():
        raise SystemExit(f"--self-run {folder}: no state.json (not a psr-ray run output folder)")
    state = json.loads((folder / "state.json").read_text())
    stored = stored_config(str(folder))
    cfg = load_cfg(args, f"run.output_dir={stored.run.output_dir}", f"run.num_iterations={stored.run.num_iterations}",
                   f"run.wandb_mode={stored.run.wandb_mode}")  # fmt: skip
    try:
        check_resume(stored, cfg, str(folder))
    except ValueError as err:
        raise SystemExit(f"--self-run: {err} (the run was made with another config than this bench's)") from None
    # "train" is search + step-DPO (overlapped): the search's own seconds are inside it
    seconds = sum(float(s.get("seconds", 0.0)) for it in state["iterations"].values()
                  for name, s in it.items() if name != "search")  # fmt: skip
    return {"output_dir": str(folder), "state": state, "seconds": seconds, "taken_from": str(folder),
            "peak_gib": max(state.get("peak_memory_gib", {}).values(), default=None),
            "judge_mode": str(cfg.judge.mode)}  # fmt: skip


def random_preferences(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The control's pairs: each stored step keeps its candidates; chosen is drawn uniformly among the
    non-empty candidates, rejected among those with another text (the random pick of oracle/precision.py)."""
    out = []
    for row in rows:
        rng = random.Random(f"{seed}/{row['pair_id']}")
        texts = [c.strip() for c in row["candidates"] if c.strip()]
        chosen = rng.choice(texts)
        others = [t for t in texts if t != chosen]
        if not others:
            continue
        out.append(row | {"chosen": chosen, "rejected": rng.choice(others), "judge_mode": "random",
                          "chosen_score": 0.0, "rejected_score": 0.0})  # fmt: skip
    return out


def stage_random(args: argparse.Namespace, work: Path, control: str) -> dict[str, Any]:
    import pyarrow as pa
    import ray.data
    from transformers import AutoTokenizer

    from psr_ray.data.pairs_io import read_pairs
    from psr_ray.data.problems import load_problems
    from psr_ray.data.schema import STEP_PAIR_SCHEMA
    from psr_ray.evaluation.judging import pairs_precision
    from psr_ray.init_data.build import read_pairs as read_judge_pairs
    from psr_ray.pipeline.init_cache import init_dir
    from psr_ray.pipeline.init_stage import read_result, score_model
    from psr_ray.pipeline.session import RunSession
    from psr_ray.trainer.group import train_dpo

    arm = CONTROLS[control][0]
    folder = arm_folder(work, arm)
    if not (folder / "state.json").is_file():
        raise SystemExit(f"--stage {control}: the {arm} arm has no run in {folder} (run --stage {arm} first)")
    cfg = load_cfg(args, f"run.output_dir={work / control}")
    session = RunSession(cfg)
    session.start_ray()
    m1 = read_result(init_dir(cfg))
    rows = random_preferences(read_pairs(str(folder), 1).to_pylist(), cfg.run.seed)
    problems = {p.problem_id: p for p in load_problems(cfg.data.source, split=cfg.data.split, seed=None).problems}
    start = time.perf_counter()
    with PeakMemory() as memory:
        trained = train_dpo(cfg, policy_path=m1.hf_dir, reference_path=m1.hf_dir,
                            dataset=ray.data.from_arrow(pa.Table.from_pylist(rows, schema=STEP_PAIR_SCHEMA)),
                            output_dir=str(work / control / "checkpoints"), policy_version=2)  # fmt: skip
        train_s = time.perf_counter() - start
        tokenizer = AutoTokenizer.from_pretrained(m1.hf_dir)
        pairs = [p.pair for p in read_judge_pairs(m1.data_files["heldout_pairs"])]
        with session.temporary_engines("rollout", trained.hf_dir, 2) as engines:
            scores = score_model(cfg, engines, tokenizer, pairs, _eft_mode(cfg))
    precision = pairs_precision(rows, problems)
    return {"arm": arm, "candidates_from": str(folder), "hf_dir": trained.hf_dir, "num_pairs": len(rows),
            "scores": scores, "train_s": train_s,
            "train_metrics": trained.metrics, "pair_precision": None if precision is None else precision.to_dict(),
            "seconds": time.perf_counter() - start, "peak_gib": memory.peak_gib}  # fmt: skip


def _eft_mode(cfg: Any) -> Any:
    from psr_ray.pipeline.init_stage import eft_mode

    return eft_mode(cfg)


def stage_mc(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Monte-Carlo values (M1's rollouts) of stored candidates against their exact labels."""
    from transformers import AutoTokenizer

    from psr_ray.data.pairs_io import read_pairs
    from psr_ray.data.problems import load_problems
    from psr_ray.oracle.judge import label_steps, previous_steps
    from psr_ray.oracle.rollouts import StepToValue, hard_label, rollout_values
    from psr_ray.pipeline.init_cache import init_dir
    from psr_ray.pipeline.init_stage import read_result
    from psr_ray.pipeline.session import RunSession

    cfg = load_cfg(args)
    session = RunSession(cfg)
    session.start_ray()
    m1 = read_result(init_dir(cfg))
    problems = {p.problem_id: p for p in load_problems(cfg.data.source, split=cfg.data.split, seed=None).problems}
    items, exact = [], []
    for row in read_pairs(str(arm_folder(work, "oracle")), 1).to_pylist():
        problem = problems[row["problem_id"]]
        texts = sorted({c.strip() for c in row["candidates"] if c.strip()})
        for text, label in zip(texts, label_steps(problem, row["prefix"], texts), strict=True):
            items.append(StepToValue(problem, tuple(previous_steps(row["prefix"])), text))
            exact.append(label)
    rng = random.Random(0)
    chosen = sorted(rng.sample(range(len(items)), min(args.mc_items, len(items))))
    items, exact = [items[i] for i in chosen], [exact[i] for i in chosen]
    start = time.perf_counter()
    with session.temporary_engines("rollout", m1.hf_dir, 1) as engines:
        values = rollout_values(engines, AutoTokenizer.from_pretrained(m1.hf_dir), items,
                                num_rollouts=args.mc_rollouts, max_tokens=cfg.eval.max_tokens)  # fmt: skip
    mc = [hard_label(v) for v in values]
    return {"num_items": len(items), "num_rollouts": args.mc_rollouts, "seconds": time.perf_counter() - start,
            "agree": sum(a == b for a, b in zip(mc, exact, strict=True)),
            "exact_right_mc_right": sum(a and b for a, b in zip(exact, mc, strict=True)),
            "exact_right_mc_wrong": sum(a and not b for a, b in zip(exact, mc, strict=True)),
            "exact_wrong_mc_right": sum(b and not a for a, b in zip(exact, mc, strict=True)),
            "exact_wrong_mc_wrong": sum(not a and not b for a, b in zip(exact, mc, strict=True)),
            "mean_value_exact_right": _mean([v for v, e in zip(values, exact, strict=True) if e]),
            "mean_value_exact_wrong": _mean([v for v, e in zip(values, exact, strict=True) if not e])}  # fmt: skip


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE.parent / "runs" / "fidelity"), help="stage outputs (resumable)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    parser.add_argument("--redo", action="store_true", help="run the named stages again even if recorded")
    parser.add_argument("--config", action="append", help="YAML config(s); default: the embedded preset")
    parser.add_argument("--iterations", type=int, default=2, help="self-judged iterations (M2, M3)")
    parser.add_argument("--self-run", help="the self arm from this `psr-ray run` output folder (same config)")
    parser.add_argument("--mc-items", type=int, default=120)
    parser.add_argument("--mc-rollouts", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results" / "fidelity.md"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_self = stage_self_run if args.self_run else (lambda a, w: stage_loop(a, w, "self"))
    runners = {"init": stage_init, "self": run_self,
               "oracle": lambda a, w: stage_loop(a, w, "oracle"), "mc": stage_mc}  # fmt: skip
    for control in CONTROLS:
        runners[control] = lambda a, w, control=control: stage_random(a, w, control)
    for stage in args.stage or STAGES:
        if stage == "report":
            from fidelity_report import write_fidelity_report  # bench/fidelity_report.py

            write_fidelity_report(work, Path(args.out), command=_command(args), machine=_machine())
            continue
        if recorded(work, stage) is not None and not args.redo:
            print(f"[fidelity] {stage}: recorded in {work}, skipped (--redo to run it again)", flush=True)
            continue
        print(f"[fidelity] {stage} ...", flush=True)
        started = time.perf_counter()
        result = runners[stage](args, work)
        result["wall_s"] = time.perf_counter() - started
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record(work, stage, result)
        print(f"[fidelity] {stage}: {result['wall_s']:.0f} s", flush=True)


def _command(args: argparse.Namespace) -> str:
    self_run = [f"--self-run {args.self_run}"] if args.self_run else []
    return " ".join(["python bench/fidelity.py", *self_run, *args.overrides])


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


if __name__ == "__main__":
    main()
