"""Evaluation reports: the per-iteration results as JSON and a Markdown table, and a PNG of accuracy per
benchmark against iteration. Rows are plain dicts (`eval.BenchmarkResult.row`), so a run can append one
iteration at a time and rewrite the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    ("iteration", "iteration", "{}"),
    ("benchmark", "benchmark", "{}"),
    ("n", "n", "{}"),
    ("accuracy", "accuracy %", "pct"),
    ("accuracy_boxed", "boxed accuracy %", "pct"),
    ("format_compliance", "format %", "pct"),
    ("steps_per_solution", "steps/solution", "{:.2f}"),
    ("tokens_per_step", "tokens/step", "{:.1f}"),
    # Filled by the driver loop for the iteration that produced the evaluated model.
    ("policy_version", "policy", "{}"),
    ("pairs", "pairs", "{}"),
    ("rollbacks", "rollbacks", "{}"),
    ("unparseable_rate", "unparseable %", "pct"),
    ("search_train_s", "search+train s", "{:.0f}"),
    # The weight sync that put this iteration's model into the engines (weight_sync/stage.py).
    ("sync_transport", "sync", "{}"),
    ("sync_engines", "engines", "{}"),
    ("sync_mb", "sync MB", "{:.0f}"),
    ("sync_s", "sync s", "{:.2f}"),
    ("sync_gbps", "sync GB/s", "{:.2f}"),
    ("eval_s", "eval s", "{:.0f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `rows`; a column no row has is left out (a plain eval has no search figures)."""
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)] or list(COLUMNS[:2])
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif fmt == "pct":
                cells.append(f"{100 * value:.1f}")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], out_dir: str) -> dict[str, Path]:
    """Writes results.json, results.md and accuracy.png into `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    paths["markdown"].write_text("# Evaluation (greedy)\n\n" + format_table(rows) + "\n")
    plot_accuracy(rows, paths["plot"])
    return paths


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per benchmark: accuracy (%) at each iteration, each point labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(row["benchmark"] for row in rows))
    iterations = sorted({int(row["iteration"]) for row in rows})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name in benchmarks:
        points = sorted((int(r["iteration"]), 100 * r["accuracy"]) for r in rows if r["benchmark"] == name)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        sizes = sorted({int(r["n"]) for r in rows if r["benchmark"] == name and r.get("n") is not None})
        label = f"{name} (n={'/'.join(map(str, sizes))})" if sizes else name
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for x, y in points:
            ax.annotate(
                f"{y:.1f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
                color=line.get_color(),
            )
    ax.set_xticks(iterations)
    ax.set_xlabel("iteration (0 = initial model)")
    ax.set_ylabel("accuracy (%)")
    top = max((100 * r["accuracy"] for r in rows), default=0.0)
    ax.set_ylim(0, min(100.0, max(10.0, top * 1.2 + 2)))
    ax.set_title("Greedy accuracy per benchmark")
    ax.grid(alpha=0.3)
    if benchmarks:
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_solutions(result: Any, out_dir: str, *, name: str = "solutions.jsonl") -> Path:
    """Every scored solution of an `eval.EvalResult`, one JSON object a line, for reading what went wrong."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for bench in result.benchmarks:
            for score in bench.scores:
                f.write(json.dumps({"benchmark": bench.benchmark, **score.__dict__}) + "\n")
    return path
