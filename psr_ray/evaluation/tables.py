"""Evaluation reports: results as JSON, a Markdown table and a PNG.

- `write_report(rows, dir)`: a plain evaluation (`psr-ray eval`): one row per benchmark.
- `write_run_report(models, dir)`: a run (`psr-ray run`, bench/fidelity.py): one entry per model (M0, M1, M2,
  ...), each with its benchmark rows, its judge's pair accuracy on held-out oracle-labelled pairs (both orders,
  the search's soft vote; per-judgment accuracy and the share of "A" beside it) and, for a trained model, the pair precision of the pairs it was trained on beside a random pick among the same candidates.
  The headline accuracy is the paper's (last `\\boxed{}`), the lenient rule beside it, both with 95% Wilson
  intervals, and an exact McNemar p-value against the model each entry is compared with (by default the one
  before it), on the same problems.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from psr_ray.core.stats import mcnemar

COLUMNS = (
    ("iteration", "iteration", "{}"),
    ("benchmark", "benchmark", "{}"),
    ("n", "n", "{}"),
    ("accuracy_boxed", "accuracy % (boxed)", "pct"),
    ("accuracy", "lenient accuracy %", "pct"),
    ("format_compliance", "format %", "pct"),
    ("steps_per_solution", "steps/solution", "{:.2f}"),
    ("tokens_per_step", "tokens/step", "{:.1f}"),
    # Filled by the driver loop for the iteration that produced the evaluated model.
    ("policy_version", "policy", "{}"),
    ("pairs", "pairs", "{}"),
    ("rollbacks", "rollbacks", "{}"),
    ("margins", "pair margin min/q1/median/q3/max", "{}"),
    ("unparseable_rate", "unparseable %", "pct"),
    ("search_train_s", "search+train s", "{:.0f}"),
    # The weight sync that put this iteration's model into the engines (pipeline/sync_stage.py).
    ("sync_transport", "sync", "{}"),
    ("sync_engines", "engines", "{}"),
    ("sync_mb", "sync MB", "{:.0f}"),
    ("sync_s", "sync s", "{:.2f}"),
    ("sync_gbps", "sync GB/s", "{:.2f}"),
    ("eval_s", "eval s", "{:.0f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of plain eval `rows`; accuracies show their 95% interval where the row has one."""
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)] or list(COLUMNS[:2])
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif fmt == "pct":
                cells.append(pct(value, row.get(f"{key}_ci95")))
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pct(value: float | None, ci: list[float] | None = None) -> str:
    """`12.3` or `12.3 [9.1, 16.4]` (percent); empty for None."""
    if value is None:
        return ""
    return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def write_report(rows: list[dict[str, Any]], out_dir: str) -> dict[str, Path]:
    """Writes results.json, results.md and accuracy.png into `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    paths["markdown"].write_text("# Evaluation (greedy)\n\n" + format_table(rows) + "\n")
    models = [{"model": f"iteration {i}", "rows": [r for r in rows if r["iteration"] == i]}
              for i in sorted({int(r["iteration"]) for r in rows})]  # fmt: skip
    plot_models(models, paths["plot"])
    return paths


def compare(models: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, benchmark) -> McNemar of the boxed results against the entry's `baseline` (default: the entry
    before it), where both were computed on the same problems."""
    by_name = {m["model"]: m for m in models}
    out = {}
    for i, model in enumerate(models):
        base_name = model.get("baseline", models[i - 1]["model"] if i else None)
        base = by_name.get(base_name) if base_name else None
        if base is None:
            continue
        base_rows = {r["benchmark"]: r for r in base["rows"]}
        for row in model["rows"]:
            other = base_rows.get(row["benchmark"])
            if other is None or other.get("problems_digest") != row.get("problems_digest") or "boxed_bits" not in row:
                continue
            test = mcnemar([b == "1" for b in other["boxed_bits"]], [b == "1" for b in row["boxed_bits"]])
            out[(model["model"], row["benchmark"])] = {"baseline": base_name, "p_value": test.p_value,
                                                       "only_baseline": test.only_before, "only_model": test.only_after}  # fmt: skip
    return out


RUN_HEADER = (
    "| model | trained on | benchmark | n | accuracy % (boxed) [95% CI] | lenient % [95% CI] | McNemar p (vs) | "
    "judge pair acc % [95% CI] | judgment acc % | share A % | pairs | pair precision % [95% CI] | random pick % | "
    "stage s |"
)


def judge_cells(judge: dict[str, Any] | None) -> list[str]:
    """A judge's three cells (`JudgeScores.to_dict()`): pair accuracy over both orders with its CI and the
    number of pairs (the headline: a judge whose position bias outweighs what it knows scores exactly 50% per
    judgment on balanced orders, whatever it knows), per-judgment accuracy, the share of "A" verdicts."""
    if not judge:
        return ["", "", ""]
    return [pct(judge["pair_accuracy"], judge["pair_accuracy_ci95"]) + f" (n={judge['num_pairs']})",
            pct(judge["accuracy"]), pct(judge["share_a"])]  # fmt: skip


def format_run_table(models: list[dict[str, Any]]) -> str:
    """The run's results table (see the module docstring); one line per model and benchmark."""
    tests = compare(models)
    lines = [RUN_HEADER, "|" + "---|" * RUN_HEADER.count(" | ") + "---|"]
    for model in models:
        precision = model.get("pair_precision")
        precision_cell = random_cell = ""
        if precision:
            precision_cell = pct(precision["precision"], precision["precision_ci95"]) + f" (n={precision['num_pairs']})"
            random_cell = pct(precision["random_pick"])
        seconds = model.get("seconds") or {}
        stage = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items() if v is not None)
        for row in model["rows"] or [{}]:
            test = tests.get((model["model"], row.get("benchmark")))
            p_cell = (
                ""
                if test is None
                else f"{_p(test['p_value'])} (vs {test['baseline']}: {test['only_model']}+/{test['only_baseline']}-)"
            )
            cells = [model["model"], model.get("trained_on", ""), row.get("benchmark", ""), str(row.get("n", "")),
                     pct(row.get("accuracy_boxed"), row.get("accuracy_boxed_ci95")),
                     pct(row.get("accuracy"), row.get("accuracy_ci95")), p_cell, *judge_cells(model.get("judge")),
                     "" if model.get("pairs") is None else str(model["pairs"]), precision_cell, random_cell, stage]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p(p: float) -> str:
    from psr_ray.core.stats import format_p

    return format_p(p)


NOTES = (
    "accuracy: the paper's rule, the last \\boxed{} answer, equivalent to the reference; lenient: boxed, else "
    '"the answer is", else the last number. McNemar: exact two-sided test on the same problems against the model '
    "named, with the problems only this model got right (+) and only that one got right (-). judge pair acc: held-out "
    "oracle-labelled step pairs (a right and a wrong candidate of M1) the judge gets right over both orders (the mean "
    "P(right step better) of the two orders > 0.5, the search's soft vote); judgment acc: single verdicts right; "
    'share A: verdicts saying "A" (50 = no position bias). pair precision: '
    "pairs whose chosen step the oracle labels right and rejected step wrong; random pick: the same statistic for "
    "a uniformly random (chosen, rejected) among the same stored candidates. An ORACLE judge is an ablation."
    " So is a LIKELIHOOD judge (the model's own log-probability of each step ranks them): a run with it measures"
    " that judge on the held-out pairs from M1 on; M0's figure, from the init, is the direct judge's."
)


def write_run_report(models: list[dict[str, Any]], out_dir: str, *, title: str = "Results",
                     footer: str = "") -> dict[str, Path]:  # fmt: skip
    """results.json (the models as given), results.md (table + notes) and accuracy.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(models, indent=2) + "\n")
    paths["markdown"].write_text(
        f"# {title}\n\n{format_run_table(models)}\n\n{NOTES}\n" + (f"\n{footer}\n" if footer else "")
    )
    plot_models(models, paths["plot"])
    return paths


def plot_models(models: list[dict[str, Any]], path: Path) -> None:
    """Boxed accuracy per model with 95% intervals, one series per benchmark; beside it, when any model has
    them, judge pair accuracy and pair precision (with the random pick) per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    extra = any(m.get("judge") or m.get("pair_precision") for m in models)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 7, 4.4), dpi=120, squeeze=False)
    names = [m["model"] for m in models]
    benchmarks = list(dict.fromkeys(r["benchmark"] for m in models for r in m["rows"]))
    ax = axes[0][0]
    for k, bench in enumerate(benchmarks):
        xs, ys, lo, hi, present = [], [], [], [], []
        for i, m in enumerate(models):
            row = next((r for r in m["rows"] if r["benchmark"] == bench), None)
            if row is None:
                continue
            present.append(i)
            ci = row.get("accuracy_boxed_ci95") or [row["accuracy_boxed"]] * 2
            xs.append(i + 0.08 * (k - (len(benchmarks) - 1) / 2))
            ys.append(100 * row["accuracy_boxed"])
            # max(0, .): an interval end can miss its point by a rounding error, and errorbar refuses < 0.
            lo.append(max(0.0, 100 * (row["accuracy_boxed"] - ci[0])))
            hi.append(max(0.0, 100 * (ci[1] - row["accuracy_boxed"])))
        n = sorted({r["n"] for m in models for r in m["rows"] if r["benchmark"] == bench})
        bars = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, linestyle="none",
                           label=f"{bench} (n={'/'.join(map(str, n))})")  # fmt: skip
        # A line joins the iteration chain M0 -> M1 -> ... only; an ablation or control ("M2 oracle") stands alone.
        chain = [(x, y) for x, y, i in zip(xs, ys, present, strict=True) if re.fullmatch(r"M\d+", names[i])]
        ax.plot([c[0] for c in chain], [c[1] for c in chain], color=bars.lines[0].get_color())
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, fontsize=8)
    ax.set_ylabel("accuracy % (last \\boxed{}), 95% CI")
    ax.set_title("Greedy accuracy per model")
    ax.grid(alpha=0.3)
    if benchmarks:
        ax.legend(loc="best", fontsize=8)
    if extra:
        _plot_judging(axes[0][1], models)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_judging(ax: Any, models: list[dict[str, Any]]) -> None:
    names = [m["model"] for m in models]
    series = (("judge", "pair_accuracy", "pair_accuracy_ci95", "judge pair accuracy (held-out, both orders)", -0.1),
              ("pair_precision", "precision", "precision_ci95", "pair precision", 0.1))  # fmt: skip
    for key, value_key, ci_key, label, shift in series:
        pts = [(i + shift, m[key][value_key], m[key][ci_key]) for i, m in enumerate(models) if m.get(key)]
        if pts:
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], capsize=4, marker="o", linestyle="none",
                        yerr=[[max(0.0, 100 * (p[1] - p[2][0])) for p in pts],
                              [max(0.0, 100 * (p[2][1] - p[1])) for p in pts]], label=label)  # fmt: skip
    rand = [(i + 0.1, m["pair_precision"]["random_pick"]) for i, m in enumerate(models) if m.get("pair_precision")]
    if rand:
        ax.scatter([p[0] for p in rand], [100 * p[1] for p in rand], marker="x", color="black", label="random pick")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%  (95% CI)")
    ax.set_title("Judging: held-out judge pair accuracy; pair precision vs random pick")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def write_solutions(result: Any, out_dir: str, *, name: str = "solutions.jsonl") -> Path:
    """Every scored solution of an `eval.EvalResult`, one JSON object a line, for reading what went wrong."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for bench in result.benchmarks:
            for score in bench.scores:
                f.write(json.dumps({"benchmark": bench.benchmark, **score.__dict__}) + "\n")
    return path
