"""The run's results (`<output_dir>/results.{json,md}`, `accuracy.png`) from what `state.json` recorded: one
entry per model, M0 (when the run initialized first) and M1, then the model each iteration trained, with its
benchmark rows, judge pair accuracy (both orders), the pair precision of its training pairs and the stage times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psr_ray.evaluation.tables import write_run_report

JUDGE_LABELS = {"direct": "self-judged (direct)", "explain": "self-judged (explain)",
                "oracle": "ORACLE-judged (ablation)", "likelihood": "LIKELIHOOD-judged (ablation)"}  # fmt: skip


def models_from_state(state: Any, *, judge_mode: str, m0: dict[str, Any] | None = None,
                      init_seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Report entries (see `report.write_run_report`) for every evaluated iteration of `state` (a RunState)."""
    models = []
    if m0 is not None:
        models.append({"model": "M0", "trained_on": "", "rows": m0["benchmarks"], "judge": m0.get("judge"),
                       "seconds": {"eval": m0.get("eval_s")}})  # fmt: skip
    for key in sorted(state.data["iterations"], key=int):
        k = int(key)
        evaluated = state.stage(k, "eval")
        if evaluated is None:
            continue
        search, train = state.stage(k, "search") or {}, state.stage(k, "train") or {}
        entry: dict[str, Any] = {"model": f"M{k + 1}", "rows": evaluated["rows"], "judge": evaluated.get("judge"),
                                 "pair_precision": evaluated.get("pair_precision")}  # fmt: skip
        if k == 0:
            entry["trained_on"] = "init SFT (IFT + EFT)" if m0 is not None else "the configured model"
            entry["seconds"] = {**(init_seconds or {}), "eval": evaluated.get("seconds")}
        else:
            entry["trained_on"] = f"M{k}'s {JUDGE_LABELS.get(judge_mode, judge_mode)} pairs"
            entry["pairs"] = search.get("pairs_total")
            entry["seconds"] = {"search": search.get("seconds"), "search+train": train.get("seconds"),
                                "eval": evaluated.get("seconds")}  # fmt: skip
        models.append(entry)
    return models


def result_row(state: Any, row: dict[str, Any], iteration: int, policy_version: int) -> dict[str, Any]:
    """An eval row with the iteration's search and training figures beside it (the results table)."""
    from psr_ray.pipeline.sync_stage import sync_columns

    search = state.stage(iteration, "search") or {}
    train = state.stage(iteration, "train") or {}
    return {
        **row,
        "policy_version": policy_version,
        "pairs": search.get("pairs_total"),
        "rollbacks": search.get("rollbacks"),
        "margins": margins_cell(search),
        "unparseable_rate": search.get("unparseable_rate"),
        "search_train_s": train.get("seconds"),
        **sync_columns(state.stage(iteration, "sync")),
    }


def write_results(state: Any, out_dir: str | Path, *, judge_mode: str, m0: dict[str, Any] | None = None,
                  init_seconds: dict[str, float] | None = None) -> dict[str, Path]:  # fmt: skip
    models = models_from_state(state, judge_mode=judge_mode, m0=m0, init_seconds=init_seconds)
    title = f"PSR run: {JUDGE_LABELS.get(judge_mode, judge_mode)} step pairs"
    memory = memory_line(state.data.get("peak_memory_gib", {}), state.data.get("peak_memory_roles_gib", {}))
    nodes = node_memory_lines(state.data.get("peak_memory_nodes_gib", {}))
    footer = "\n\n".join(x for x in (iteration_table(state), memory, nodes, trainer_memory_lines(state)) if x)
    return write_run_report(models, str(out_dir), title=title, footer=footer)


ITERATION_HEADER = ("| iteration | pairs | pair margin min/q1/median/q3/max | optimizer steps | pairs trained | "
                    "held-out KL/token | held-out reward acc % | sync | engines | sync MB | sync s | sync GB/s |")  # fmt: skip


def iteration_table(state: Any) -> str:
    """Per iteration: its pairs, the fit (steps, pairs trained, held-out KL of M_{k+1} to M_k and reward
    accuracy on the init's held-out pairs) and the weight sync (transport, engines, MB, s, GB/s)."""
    from psr_ray.pipeline.sync_stage import sync_columns

    lines = []
    for key in sorted(state.data["iterations"], key=int):
        k = int(key)
        search, train = state.stage(k, "search"), state.stage(k, "train")
        if k == 0 or train is None:
            continue
        heldout, sync = train.get("heldout") or {}, sync_columns(state.stage(k, "sync"))
        cells = [k, (search or {}).get("pairs_total"), margins_cell(search or {}), train.get("num_optimizer_steps"),
                 train.get("num_pairs_trained"), _fmt("{:.2e}", heldout.get("heldout/kl_per_token")),
                 _fmt("{:.1f}", None if "heldout/reward_accuracy" not in heldout else 100 * heldout["heldout/reward_accuracy"]),
                 sync.get("sync_transport"), sync.get("sync_engines"), _fmt("{:.0f}", sync.get("sync_mb")),
                 _fmt("{:.2f}", sync.get("sync_s")), _fmt("{:.2f}", sync.get("sync_gbps"))]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    if not lines:
        return ""
    return "\n".join([ITERATION_HEADER, "|" + "---|" * ITERATION_HEADER.count(" | ") + "---|", *lines])


def _fmt(fmt: str, value: float | None) -> str | None:
    return None if value is None else fmt.format(value)


def memory_line(peaks: dict[str, float], roles: dict[str, dict[str, float]] | None = None) -> str:
    """The peak memory per stage (psr_ray.runtime.memory: PSS of this node's run processes) against the machine's, its
    half (the goal), and the split by process role at the highest peak."""
    from psr_ray.runtime.memory import machine_gib

    if not peaks:
        return ""
    stage, top = max(peaks.items(), key=lambda item: item[1])
    total = machine_gib()
    per_stage = ", ".join(f"{name} {gib:.1f}" for name, gib in peaks.items())
    line = (f"Peak memory (PSS of this node's run processes, GiB): {top:.1f} in `{stage}`, {100 * top / total:.0f}% "
            f"of this machine's {total:.1f} GiB ({top / (total / 2):.2f} x half of it). Per stage: {per_stage}.")  # fmt: skip
    split = (roles or {}).get(stage)
    if split:
        line += f" At that peak: {', '.join(f'{role} {gib:.2f}' for role, gib in split.items())}."
    return line


def node_memory_lines(per_stage: dict[str, dict[str, dict[str, Any]]]) -> str:
    """On a cluster: each node's highest peak (PSS of its Ray processes), the stage it came in and the split
    by role at that peak."""
    best: dict[str, tuple[float, str, dict[str, float]]] = {}
    for stage, nodes in per_stage.items():
        for node, figures in nodes.items():
            if node not in best or figures["peak"] > best[node][0]:
                best[node] = (figures["peak"], stage, figures.get("roles", {}))
    if not best:
        return ""
    lines = ["Peak memory per node (PSS of the node's Ray processes, GiB):"]
    for node, (peak, stage, roles) in sorted(best.items()):
        split = ", ".join(f"{role} {gib:.2f}" for role, gib in roles.items() if gib >= 0.005)
        lines.append(f"- {node}: {peak:.1f} in `{stage}`" + (f" ({split})" if split else ""))
    return "\n".join(lines)


def trainer_memory_lines(state: Any) -> str:
    """Per fit: each trainer worker's measured memory against its parts (trainer/memory_budget.py)."""
    from psr_ray.trainer.memory_budget import budget_line

    lines = []
    for key in sorted(state.data["iterations"], key=int):
        line = budget_line(((state.stage(int(key), "train") or {}).get("final")) or {})
        if line:
            lines.append(f"Trainer memory, iteration {key} (GiB): {line}.")
    return "\n".join(lines)


def margins_cell(search: dict[str, Any]) -> str | None:
    """The iteration's pair margin distribution as one results-table cell, e.g. `1.00/1.50/2.00/3.00/4.00`."""
    keys = ("margin_min", "margin_q1", "margin_median", "margin_q3", "margin_max")
    if search.get("margin_min") is None:
        return None
    return "/".join(f"{search[k]:.2f}" for k in keys)
