"""`psr-ray init` and the run's init-first step: M0 -> M1 the paper's way (arXiv 2503.03746, section 3.2).

  A  engines on M0 propose candidate steps at one step of each EFT problem; the step oracle labels them;
     a right and a wrong candidate form an EFT pair (the model's *own* candidates)
  B  SFT of M0 on IFT rows + EFT rows (both orders) on the trainer group -> M1 (an HF export)
  C  engines on M1 propose candidates on held-out problems (at the search's temperature) -> oracle-labelled
     held-out pairs; the judge accuracy of M0 and M1 on them (both orders) and their greedy accuracy on
     `eval.benchmarks`

The EFT:IFT ratio (`init.eft_ift_ratio`, rows) is reported with every init beside the rows really built.
Engines are started for each phase and stopped after it, so none holds memory while the trainer runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig
from psr_ray.init_data.build import (
    eft_rows,
    ift_rows,
    load_worked_problems,
    num_eft_pairs,
    pair_rows,
    split_problems,
    write_parquet,
)
from psr_ray.init_data.candidates import Sampling, oracle_pairs

RESULT_FILE = "init.json"


@dataclass
class InitResult:
    output_dir: str
    hf_dir: str  # M1, an HF folder
    judge_mode: str  # the mode of the EFT rows and of the judge scores
    eft_ift_ratio: float  # configured EFT rows per IFT row
    num_ift_rows: int
    num_eft_pairs: int
    num_eft_rows: int  # 2 per pair (both orders)
    num_heldout_pairs: int
    heldout_problem_ids: list[str]  # never trained on, never searched
    data_files: dict[str, str]
    eft_counts: dict[str, int] = field(default_factory=dict)  # sites, candidates, right, mixed_sites (M0)
    heldout_counts: dict[str, int] = field(default_factory=dict)  # the same for M1 on held-out problems
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    # model -> {"judge": JudgeScores.to_dict(), "benchmarks": [eval rows]}
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def eft_rows_per_ift_row(self) -> float:
        return self.num_eft_rows / self.num_ift_rows if self.num_ift_rows else 0.0


def eft_mode(cfg: PSRConfig) -> JudgeMode:
    """EFT teaches the judge the run uses: `explain` rows for explain, `direct` rows otherwise (an oracle run
    shares its M1 with the self-judged run it is the ablation of)."""
    return JudgeMode.EXPLAIN if cfg.judge.mode == JudgeMode.EXPLAIN else JudgeMode.DIRECT


def initialize(cfg: PSRConfig, *, output_dir: str, evaluate: tuple[str, ...] = ("M0", "M1")) -> InitResult:
    """Phases A-C of the module docstring into `output_dir` (an SFT checkpoint already there is reused);
    writes `init.json` last. `evaluate` names the models scored in phase C."""
    import pyarrow as pa
    import ray.data
    from transformers import AutoTokenizer

    from psr_ray.cluster import init_ray
    from psr_ray.models import resolve_model_path
    from psr_ray.trainer.group import train_sft

    clock = time.perf_counter()
    out = Path(output_dir).expanduser().resolve()
    icfg = cfg.init
    model_path = resolve_model_path(cfg.model.path, cfg.run.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    problems = load_worked_problems(
        cfg.data.source, split=cfg.data.split, seed=cfg.data.shuffle_seed, max_chars=cfg.data.max_problem_chars
    )
    split = split_problems(problems, num_heldout=icfg.num_heldout_problems, num_ift=icfg.num_ift_examples)
    mode = eft_mode(cfg)
    sampling = Sampling(num_candidates=icfg.num_candidates, temperature=icfg.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_step_tokens, num_rollouts=icfg.num_rollouts, seed=cfg.run.seed)  # fmt: skip
    ift = ift_rows(tokenizer, split.ift)
    init_ray(cfg)
    seconds: dict[str, float] = {}

    with _timed(seconds, "eft_candidates"), temporary_engines(cfg, "rollout", model_path, 0) as m0:
        eft_pairs, eft_counts = oracle_pairs(m0, tokenizer, split.eft, sampling=sampling,
                                             num_pairs=num_eft_pairs(len(ift), icfg.eft_ift_ratio))  # fmt: skip
    eft = eft_rows(tokenizer, eft_pairs, mode=mode)
    files = {"ift_train": write_parquet(ift, out / "ift_train.parquet"),
             "eft_train": write_parquet(eft, out / "eft_train.parquet")}  # fmt: skip
    train_rows = [{"prompt_text": r["prompt_text"], "target_text": r["target_text"]} for r in ift + eft]
    random.Random(cfg.run.seed).shuffle(train_rows)  # IFT and EFT interleaved in every batch
    print(f"[init] IFT {len(ift)} rows, EFT {len(eft_pairs)} pairs = {len(eft)} rows from M0's own candidates "
          f"({len(eft) / len(ift):.3f} EFT rows per IFT row; configured {icfg.eft_ift_ratio}); "
          f"EFT sites {eft_counts}", flush=True)  # fmt: skip

    with _timed(seconds, "sft"):
        trained = train_sft(cfg, model_path=model_path, dataset=ray.data.from_arrow(pa.Table.from_pylist(train_rows)),
                            output_dir=str(out / "sft"), policy_version=1, num_rows=len(train_rows))  # fmt: skip
    print(f"[init] SFT: {trained.num_optimizer_steps} optimizer steps, M1 -> {trained.hf_dir}", flush=True)

    with _timed(seconds, "heldout_pairs"), temporary_engines(cfg, "rollout", trained.hf_dir, 1) as m1:
        # At the search's temperature: the pairs a judge meets in the search.
        search_like = Sampling(**{**asdict(sampling), "seed": sampling.seed + 1, "temperature": cfg.rollout.temperature})
        heldout, heldout_counts = oracle_pairs(m1, tokenizer, split.heldout, num_pairs=icfg.num_heldout_pairs,
                                               sampling=search_like)  # fmt: skip
        files["heldout_pairs"] = write_parquet(pair_rows(heldout), out / "heldout_pairs.parquet")
        scores = {}
        if "M1" in evaluate:
            scores["M1"] = score_model(cfg, m1, tokenizer, [p.pair for p in heldout], mode)
    if "M0" in evaluate:
        with _timed(seconds, "score_m0"), temporary_engines(cfg, "rollout", model_path, 0) as m0:
            scores["M0"] = score_model(cfg, m0, tokenizer, [p.pair for p in heldout], mode)
    seconds["total"] = time.perf_counter() - clock
    result = InitResult(
        output_dir=str(out), hf_dir=trained.hf_dir, judge_mode=mode.value, eft_ift_ratio=icfg.eft_ift_ratio,
        num_ift_rows=len(ift), num_eft_pairs=len(eft_pairs), num_eft_rows=len(eft), num_heldout_pairs=len(heldout),
        heldout_problem_ids=[p.problem_id for p in split.heldout], data_files={k: str(v) for k, v in files.items()},
        eft_counts=eft_counts, heldout_counts=heldout_counts, train_metrics=trained.metrics,
        scores={k: scores[k] for k in ("M0", "M1") if k in scores}, seconds=seconds,
    )  # fmt: skip
    if not eft_pairs:
        print("[init] WARNING: no EFT pair: M0 proposed no step the oracle labels right beside a wrong one, so M1 "
              "is trained on IFT only and learns no judging", flush=True)  # fmt: skip
    if len(heldout) < icfg.num_heldout_pairs:
        print(f"[init] only {len(heldout)} of init.num_heldout_pairs={icfg.num_heldout_pairs} held-out pairs: M1's "
              f"candidates were all right or all wrong on the rest of the {len(split.heldout)} held-out problems; "
              "raise init.num_heldout_problems", flush=True)  # fmt: skip
    (out / "results.md").write_text(format_init(result) + "\n")
    tmp = out / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    os.replace(tmp, out / RESULT_FILE)
    return result


def format_init(result: InitResult) -> str:
    """The init's figures: the EFT:IFT ratio, yields, SFT loss, stage times and the models' scores."""
    from psr_ray.report import RUN_HEADER, format_run_table

    models = [{"model": name, "trained_on": "" if name == "M0" else "init SFT (IFT + EFT)", "rows": s["benchmarks"],
               "judge": s["judge"], "seconds": {"eval": s.get("eval_s")}} for name, s in result.scores.items()]  # fmt: skip
    e, h = result.eft_counts, result.heldout_counts
    loss = [m["train/loss"] for m in result.train_metrics]
    lines = [
        f"EFT:IFT = {result.num_eft_rows}:{result.num_ift_rows} rows = {result.eft_rows_per_ift_row:.3f} "
        f"(configured init.eft_ift_ratio {result.eft_ift_ratio}; the paper's is about 1:7 = 0.143). EFT pairs: "
        f"{result.num_eft_pairs} from M0's own candidates ({e.get('candidates', 0)} candidates at {e.get('sites', 0)} "
        f"steps, {e.get('right', 0)} right by the oracle, {e.get('mixed_sites', 0)} steps with a right and a wrong one), "
        f"judge mode {result.judge_mode}, both orders.",
        f"Held-out judge pairs: {result.num_heldout_pairs} from M1's candidates ({h.get('candidates', 0)} at "
        f"{h.get('sites', 0)} steps of held-out problems, {h.get('right', 0)} right).",
        (f"SFT: {len(loss)} optimizer steps, loss {loss[0]:.3f} (first) -> {loss[-1]:.3f} (last)." if loss else "SFT: resumed."),
        "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()) + ".",
    ]
    table = format_run_table(models) if models else RUN_HEADER
    return "\n".join(lines) + "\n\n" + table


def read_result(output_dir: str | Path) -> InitResult | None:
    """The InitResult a finished init wrote into `output_dir`, or None."""
    path = Path(output_dir) / RESULT_FILE
    if not path.is_file():
        return None
    return InitResult(**json.loads(path.read_text()))


def score_model(cfg: PSRConfig, engines: list[Any], tokenizer: Any, pairs: list[Any], mode: JudgeMode) -> dict[str, Any]:
    """Judge accuracy on held-out pairs (both orders) and greedy accuracy on `eval.benchmarks`."""
    from psr_ray.eval import evaluate
    from psr_ray.measure import judge_accuracy

    judge = judge_accuracy(engines, pairs, mode=mode.value, max_tokens=cfg.judge.max_explanation_tokens)
    result = evaluate(engines, tokenizer, list(cfg.eval.benchmarks), limit=cfg.eval.limit or None,
                      max_tokens=cfg.eval.max_tokens)  # fmt: skip
    return {"judge": judge, "benchmarks": result.rows(0), "eval_s": result.elapsed_s}


@contextlib.contextmanager
def temporary_engines(cfg: PSRConfig, role: str, model_path: str, policy_version: int) -> Iterator[list[Any]]:
    """`role` engines on `model_path` for one phase, killed after it (their names are then free again)."""
    import ray

    from psr_ray.engines.pool import start_engine_pool

    names = [f"psr-{role}-{i}" for i in range(getattr(cfg, role).num_engines)]
    busy = sorted(set(names) & set(ray.util.list_named_actors()))
    if busy:  # a running PSR run's engines serve another model: neither borrow nor stop them
        raise ValueError(f"engines {busy} are already running in this Ray namespace; stop that run first")
    engines = start_engine_pool(cfg, role, model_path, policy_version=policy_version).actors
    try:
        yield engines
    finally:
        for engine in engines:
            ray.kill(engine)
        deadline = time.monotonic() + 60
        while set(names) & set(ray.util.list_named_actors()) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - start
