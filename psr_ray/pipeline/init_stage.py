"""`psr-ray init` and the run's init-first step: M0 -> M1 the paper's way (arXiv 2503.03746, section 3.2).

  A  engines on M0 propose candidate steps at one step of each EFT problem; the step oracle labels them;
     a right and a wrong candidate form an EFT pair (the model's *own* candidates)
  B  SFT of M0 on IFT rows + EFT rows (both orders) on the trainer group -> M1 (an HF export)
  C  engines on M1 propose candidates on held-out problems -> oracle-labelled held-out pairs; the judge
     accuracy of M0 and M1 on them (both orders) and their greedy accuracy on `eval.benchmarks`

The EFT:IFT ratio (`init.eft_ift_ratio`, rows) is reported with every init beside the rows really built.
Engines are started for each phase and stopped after it, so none holds memory while the trainer runs. Every
phase leaves its result in the output folder (pairs, the SFT checkpoint, scores per evaluation setting), so
an interrupted init resumes at the phase it was in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig
from psr_ray.init_data.build import (
    eft_rows,
    ift_rows,
    load_worked_problems,
    loss_shares,
    num_eft_pairs,
    pair_rows,
    read_pairs,
    split_problems,
    write_parquet,
)
from psr_ray.init_data.candidates import OraclePair, Sampling, oracle_pairs
from psr_ray.pipeline.session import RunSession

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
    # part (ift, eft) -> its share of the SFT loss: "rows" (what it has: rows weigh alike) and "tokens" (what a
    # mean over target tokens would give it)
    loss_shares: dict[str, dict[str, float]] = field(default_factory=dict)
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


def initialize(session: RunSession, *, output_dir: str, evaluate: tuple[str, ...] = ("M0", "M1")) -> InitResult:
    """Phases A-C of the module docstring into `output_dir` (an SFT checkpoint already there is reused), on
    the session's model and Ray; writes `init.json` last. `evaluate` names the models scored in phase C."""
    import pyarrow as pa
    import ray.data

    from psr_ray.trainer.group import train_sft

    clock = time.perf_counter()
    out = Path(output_dir).expanduser().resolve()
    cfg, icfg = session.cfg, session.cfg.init
    model_path = session.model_path
    tokenizer = session.tokenizer
    problems = load_worked_problems(
        cfg.data.source, split=cfg.data.split, seed=cfg.data.shuffle_seed, max_chars=cfg.data.max_problem_chars
    )
    split = split_problems(problems, num_heldout=icfg.num_heldout_problems, num_ift=icfg.num_ift_examples)
    mode = eft_mode(cfg)
    sampling = Sampling(num_candidates=icfg.num_candidates, temperature=icfg.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_step_tokens, num_rollouts=icfg.num_rollouts, seed=cfg.run.seed)  # fmt: skip
    ift = ift_rows(tokenizer, split.ift)
    session.start_ray()
    seconds: dict[str, float] = {}

    def propose(model: str, version: int, problems: list[Any], num_pairs: int, seed: int) -> Callable[[], Any]:
        def build() -> tuple[list[OraclePair], dict[str, int]]:
            with session.temporary_engines("rollout", model, version) as engines:
                return oracle_pairs(engines, tokenizer, problems, num_pairs=num_pairs,
                                    sampling=Sampling(**{**asdict(sampling), "seed": seed}))  # fmt: skip

        return build

    with _timed(seconds, "eft_candidates"):
        eft_pairs, eft_counts = _pairs_phase(session, out / "eft_pairs.parquet", propose(
            model_path, 0, split.eft, num_eft_pairs(len(ift), icfg.eft_ift_ratio), sampling.seed))  # fmt: skip
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
                            output_dir=str(out / "sft"), policy_version=1)  # fmt: skip
    print(f"[init] SFT: {trained.num_optimizer_steps} optimizer steps, M1 -> {trained.hf_dir}", flush=True)

    with _timed(seconds, "heldout_pairs"):
        files["heldout_pairs"] = out / "heldout_pairs.parquet"
        heldout, heldout_counts = _pairs_phase(session, files["heldout_pairs"], propose(
            trained.hf_dir, 1, split.heldout, icfg.num_heldout_pairs, sampling.seed + 1))  # fmt: skip
    print(f"[init] held-out judge pairs: {len(heldout)} from M1's candidates; sites {heldout_counts}", flush=True)
    scores = {}
    for name, path, version in (("M0", model_path, 0), ("M1", trained.hf_dir, 1)):
        if name in evaluate:
            with _timed(seconds, f"score_{name.lower()}"):
                scores[name] = scores_of(session, out, name, path, version, [p.pair for p in heldout])
    seconds["total"] = time.perf_counter() - clock
    result = InitResult(
        output_dir=str(out), hf_dir=trained.hf_dir, judge_mode=mode.value, eft_ift_ratio=icfg.eft_ift_ratio,
        num_ift_rows=len(ift), num_eft_pairs=len(eft_pairs), num_eft_rows=len(eft), num_heldout_pairs=len(heldout),
        heldout_problem_ids=[p.problem_id for p in split.heldout], data_files={k: str(v) for k, v in files.items()},
        eft_counts=eft_counts, heldout_counts=heldout_counts, loss_shares=loss_shares(tokenizer, {"ift": ift, "eft": eft}),
        train_metrics=trained.metrics,
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
    session.commit(out / RESULT_FILE, json.dumps(asdict(result), indent=2, default=str) + "\n")  # the cache's marker
    return result


def format_init(result: InitResult) -> str:
    """The init's figures: the EFT:IFT ratio, yields, SFT loss, stage times and the models' scores."""
    from psr_ray.evaluation.tables import RUN_HEADER, format_run_table

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
        (
            f"SFT: {len(loss)} optimizer steps, loss {loss[0]:.3f} (first) -> {loss[-1]:.3f} (last)."
            if loss
            else "SFT: resumed."
        ),
        "SFT loss shares (each row's mean token loss, rows averaged): " + ", ".join(
            f"{part.upper()} {share['rows']:.1%} (a per-token mean would give {share['tokens']:.1%})"
            for part, share in result.loss_shares.items()) + ".",  # fmt: skip
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


def eval_key(cfg: PSRConfig) -> str:
    """A digest of the settings a model's scores depend on (benchmarks, limits, tokens)."""
    plain = cfg.to_dict()["eval"]
    value = {k: plain[k] for k in ("benchmarks", "limit", "max_tokens")} | {"judge": cfg.judge.max_explanation_tokens}
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def scores_of(session: RunSession, out: Path, name: str, model_path: str, version: int,
              pairs: list[Any]) -> dict[str, Any]:  # fmt: skip
    """`score_model` of `model_path` on engines started for it (with the session's tokenizer), kept in `out`
    per evaluation setting."""
    cfg = session.cfg
    path = out / f"scores_{name}_{eval_key(cfg)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    with session.temporary_engines("rollout", model_path, version) as engines:
        scores = score_model(cfg, engines, session.tokenizer, pairs, eft_mode(cfg))
    session.commit(path, json.dumps(scores, indent=2) + "\n")
    return scores


def score_model(
    cfg: PSRConfig, engines: list[Any], tokenizer: Any, pairs: list[Any], mode: JudgeMode
) -> dict[str, Any]:
    """Judge accuracy on held-out pairs (both orders) and greedy accuracy on `eval.benchmarks`."""
    from psr_ray.evaluation.benchmarks import evaluate
    from psr_ray.evaluation.judging import judge_accuracy

    timeout_s = cfg.run.engine_call_timeout_s
    judge = judge_accuracy(engines, pairs, mode=mode.value, max_tokens=cfg.judge.max_explanation_tokens,
                           timeout_s=timeout_s)  # fmt: skip
    result = evaluate(engines, tokenizer, list(cfg.eval.benchmarks), limit=cfg.eval.limit or None,
                      max_tokens=cfg.eval.max_tokens, timeout_s=timeout_s)  # fmt: skip
    return {"judge": judge, "benchmarks": result.rows(0), "eval_s": result.elapsed_s}


def _pairs_phase(
    session: RunSession, path: Path, build: Callable[[], tuple[list[OraclePair], dict[str, int]]]
) -> tuple[list[OraclePair], dict[str, int]]:
    """One phase's oracle pairs, built once: a finished phase's file and counts are read back."""
    counts_path = path.with_suffix(".counts.json")
    if path.is_file() and counts_path.is_file():
        return read_pairs(path), json.loads(counts_path.read_text())
    pairs, counts = build()
    write_parquet(pair_rows(pairs), path)
    session.commit(counts_path, json.dumps(counts) + "\n")  # last: marks the phase done
    return pairs, counts


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """An init phase: timed into `seconds`, shown as one console stage (`init: sft ... 03:12`)."""
    from psr_ray.runtime import console

    start = time.perf_counter()
    try:
        with console.stage(f"init: {name.replace('_', ' ')}"):
            yield
    finally:
        seconds[name] = time.perf_counter() - start
