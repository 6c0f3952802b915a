"""`psr-ray init` and the run's init-first step: M0 -> M1 the paper's way (arXiv 2503.03746, section 3.2).

  A0 SFT of M0 on the IFT rows alone -> M_ift: a policy that writes steps in the format (M0 got 32 of 1024
     candidate steps right, 18 EFT pairs), skipped without EFT (`init.num_eft_pairs: 0`)
  A  engines on M_ift propose candidate steps at EFT problems' prefixes, reference steps and M_ift's own
     right steps (`candidates.oracle_pairs`, own_prefixes); the step oracle labels them; a right and a wrong
     candidate of one site form an EFT pair, until `init.num_eft_pairs`
  B  SFT of M0 on IFT rows + EFT rows (both orders) on the trainer group -> M1 (an HF export); each row's mean
     token loss, rows averaged (`trainer.loss.sft_row_losses`), so a verdict weighs what a solution weighs
  C  engines on M1 propose candidates on held-out problems -> oracle-labelled held-out pairs; the judge pair
     accuracy of M0 and M1 on them (both orders) and their greedy accuracy on `eval.benchmarks`

The EFT:IFT ratio (rows) is reported with every init beside the paper's (~4.2k:28.9k), and each part's share of
the SFT loss. Engines are started for each phase and stopped after it, so none holds memory while the trainer runs. Every
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
    pair_rows,
    read_pairs,
    split_problems,
    write_parquet,
)
from psr_ray.init_data.candidates import OraclePair, Sampling, oracle_pairs
from psr_ray.pipeline.session import RunSession

RESULT_FILE = "init.json"
PAPER_EFT_IFT = (4200, 28900)  # EFT and IFT rows of the paper's M1 (arXiv 2503.03746, section 4.1)
# What M1 depends on beyond the settings (init_cache.init_key): EFT from M_ift on its own prefixes; rows weigh alike.
RECIPE = "eft-from-m_ift-own-prefixes;sft-row-mean"


@dataclass
class InitResult:
    output_dir: str
    hf_dir: str  # M1, an HF folder
    judge_mode: str  # the mode of the EFT rows and of the judge scores
    configured_eft_pairs: int  # init.num_eft_pairs
    num_ift_rows: int
    num_eft_pairs: int  # built: fewer than configured when M_ift's candidates ran out of mixed sites
    num_eft_rows: int  # 2 per pair (both orders)
    eft_ift_ratio: float  # EFT rows per IFT row, as built
    paper_eft_ift_ratio: float  # the paper's ~4.2k:28.9k rows
    num_heldout_pairs: int
    heldout_problem_ids: list[str]  # never trained on, never searched
    data_files: dict[str, str]
    ift_hf_dir: str = ""  # M_ift (an HF folder): the EFT candidates' proposer; "" without EFT
    # sites, candidates, right, mixed_sites, own_* (those on M_ift's own prefixes), of M_ift's candidates
    eft_counts: dict[str, int] = field(default_factory=dict)
    heldout_counts: dict[str, int] = field(default_factory=dict)  # the same for M1 on held-out problems
    # part (ift, eft) -> its share of the SFT loss: "rows" (what it has: rows weigh alike) and "tokens" (what a
    # mean over target tokens would give it)
    loss_shares: dict[str, dict[str, float]] = field(default_factory=dict)
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    ift_train_metrics: list[dict[str, float]] = field(default_factory=list)  # M0 -> M_ift
    # model -> {"judge": JudgeScores.to_dict(), "benchmarks": [eval rows]}
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


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
    split = split_problems(problems, num_heldout=icfg.num_heldout_problems, num_ift=icfg.num_ift_examples,
                           max_eft=icfg.max_eft_problems)  # fmt: skip
    mode = eft_mode(cfg)
    sampling = Sampling(num_candidates=icfg.num_candidates, temperature=icfg.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_step_tokens, num_rollouts=icfg.num_rollouts, seed=cfg.run.seed)  # fmt: skip
    ift = ift_rows(tokenizer, split.ift)
    session.start_ray()
    seconds: dict[str, float] = {}

    def propose(model: str, version: int, problems: list[Any], num_pairs: int, seed: int,
                own_prefixes: bool = False) -> Callable[[], Any]:  # fmt: skip
        def build() -> tuple[list[OraclePair], dict[str, int]]:
            with session.temporary_engines("rollout", model, version) as engines:
                return oracle_pairs(engines, tokenizer, problems, num_pairs=num_pairs, own_prefixes=own_prefixes,
                                    sampling=Sampling(**{**asdict(sampling), "seed": seed}))  # fmt: skip

        return build

    def sft(name: str, rows: list[dict[str, Any]]) -> Any:
        """SFT of M0 on `rows` into `out/name` (a finished checkpoint there is reused: the phase's marker)."""
        plain = [{"prompt_text": r["prompt_text"], "target_text": r["target_text"]} for r in rows]
        random.Random(cfg.run.seed).shuffle(plain)  # IFT and EFT interleaved in every batch
        with _timed(seconds, name):
            return train_sft(cfg, model_path=model_path, dataset=ray.data.from_arrow(pa.Table.from_pylist(plain)),
                             output_dir=str(out / name), policy_version=1)  # fmt: skip

    files = {"ift_train": write_parquet(ift, out / "ift_train.parquet")}
    eft_pairs: list[OraclePair] = []
    eft_counts: dict[str, int] = {}
    ift_model = None
    if icfg.num_eft_pairs:
        ift_model = sft("ift_sft", ift)
        print(f"[init] IFT-only SFT: {ift_model.num_optimizer_steps} optimizer steps, M_ift -> {ift_model.hf_dir}",
              flush=True)  # fmt: skip
        with _timed(seconds, "eft_candidates"):
            eft_pairs, eft_counts = _pairs_phase(session, out / "eft_pairs.parquet", propose(
                ift_model.hf_dir, 1, split.eft, icfg.num_eft_pairs, sampling.seed, own_prefixes=True))  # fmt: skip
    eft = eft_rows(tokenizer, eft_pairs, mode=mode)
    files["eft_train"] = write_parquet(eft, out / "eft_train.parquet")
    print(f"[init] IFT {len(ift)} rows, EFT {len(eft_pairs)} of init.num_eft_pairs={icfg.num_eft_pairs} pairs = "
          f"{len(eft)} rows from M_ift's own candidates (EFT:IFT {len(eft) / len(ift):.3f}, the paper's "
          f"{PAPER_EFT_IFT[0] / PAPER_EFT_IFT[1]:.3f}); EFT sites {eft_counts}", flush=True)  # fmt: skip

    # M1 from M0, as the paper's M1: one SFT of the base on IFT + EFT. M_ift only proposes the EFT candidates
    # (a policy that writes the steps M1 will), and starting over keeps `trainer.sft_num_epochs` the IFT
    # recipe's epochs; continuing from M_ift would give IFT a second pass at the same cost.
    trained = sft("sft", ift + eft)
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
        output_dir=str(out), hf_dir=trained.hf_dir, judge_mode=mode.value, configured_eft_pairs=icfg.num_eft_pairs,
        num_ift_rows=len(ift), num_eft_pairs=len(eft_pairs), num_eft_rows=len(eft),
        eft_ift_ratio=len(eft) / len(ift), paper_eft_ift_ratio=PAPER_EFT_IFT[0] / PAPER_EFT_IFT[1],
        num_heldout_pairs=len(heldout), heldout_problem_ids=[p.problem_id for p in split.heldout],
        data_files={k: str(v) for k, v in files.items()}, ift_hf_dir=ift_model.hf_dir if ift_model else "",
        eft_counts=eft_counts, heldout_counts=heldout_counts, loss_shares=loss_shares(tokenizer, {"ift": ift, "eft": eft}),
        train_metrics=trained.metrics, ift_train_metrics=ift_model.metrics if ift_model else [],
        scores={k: scores[k] for k in ("M0", "M1") if k in scores}, seconds=seconds,
    )  # fmt: skip
    if icfg.num_eft_pairs and len(eft_pairs) < icfg.num_eft_pairs:
        print(f"[init] WARNING: {len(eft_pairs)} of init.num_eft_pairs={icfg.num_eft_pairs} EFT pairs: M_ift's candidates "
              f"were all right or all wrong at the other sites of the {len(split.eft)} EFT problems"
              + ("; M1 learns no judging" if not eft_pairs else ""), flush=True)  # fmt: skip
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
    ift_loss = [m["train/loss"] for m in result.ift_train_metrics]
    lines = [
        f"EFT:IFT = {result.num_eft_rows}:{result.num_ift_rows} rows = {result.eft_ift_ratio:.3f} (the paper's "
        f"~{PAPER_EFT_IFT[0] / 1000:.1f}k:{PAPER_EFT_IFT[1] / 1000:.1f}k = {result.paper_eft_ift_ratio:.3f}). EFT pairs: "
        f"{result.num_eft_pairs} of init.num_eft_pairs={result.configured_eft_pairs}, from M_ift's own candidates "
        f"({e.get('candidates', 0)} candidates at {e.get('sites', 0)} steps, {e.get('own_sites', 0)} of them after "
        f"M_ift's own steps; {e.get('right', 0)} right by the oracle, {e.get('mixed_sites', 0)} steps with a right and "
        f"a wrong one, {e.get('own_mixed_sites', 0)} of them after its own steps), judge mode {result.judge_mode}, "
        "both orders.",
        (
            f"IFT-only SFT (M0 -> M_ift, the EFT candidates' proposer): {len(ift_loss)} optimizer steps, loss "
            f"{ift_loss[0]:.3f} -> {ift_loss[-1]:.3f}."
            if ift_loss
            else "IFT-only SFT: none (no EFT)."
            if not result.configured_eft_pairs
            else "IFT-only SFT: resumed."
        ),
        f"Held-out judge pairs: {result.num_heldout_pairs} from M1's candidates ({h.get('candidates', 0)} at "
        f"{h.get('sites', 0)} steps of held-out problems, {h.get('right', 0)} right).",
        (
            f"SFT (M0 -> M1, IFT + EFT): {len(loss)} optimizer steps, loss {loss[0]:.3f} (first) -> {loss[-1]:.3f} (last)."
            if loss
            else "SFT: resumed."
        ),
        "SFT loss shares (each row's mean token loss, rows averaged): "
        + ", ".join(
            f"{part.upper()} {share['rows']:.1%} (a per-token mean would give {share['tokens']:.1%})"
            for part, share in result.loss_shares.items()
        )
        + ".",  # fmt: skip
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
