"""bench/fidelity.py's report: bench/results/fidelity.md and fidelity.png from the stages' records. Every
figure is read from a record or computed here; nothing is typed in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psr_ray.core.stats import format_p, mcnemar
from psr_ray.evaluation.tables import compare, format_run_table, pct, plot_models

# bench/fidelity.py's control stages: the arm whose candidates each took, and its model's name in the tables.
CONTROLS = {"random-self": ("self", "M2 random (self)"), "random-oracle": ("oracle", "M2 random (oracle)")}
# The comparisons the report tests, each an exact McNemar on the same problems (first against second).
COMPARISONS = (
    ("M1", "M0"),
    ("M2", "M1"),
    ("M3", "M2"),
    ("M2 oracle", "M1"),
    ("M2 random (self)", "M1"),
    ("M2", "M2 random (self)"),
    ("M2 random (oracle)", "M1"),
    ("M2 oracle", "M2 random (oracle)"),
)


def _load(work: Path, stage: str) -> dict[str, Any] | None:
    path = work / f"stage_{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _eval(state: dict[str, Any], k: int) -> dict[str, Any] | None:
    return state["iterations"].get(str(k), {}).get("eval")


def build_models(work: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The report entries (report.write_run_report's shape) and the stage records they came from."""
    stages = {s: r for s in ("init", "self", "oracle", *CONTROLS, "mc") if (r := _load(work, s)) is not None}
    models: list[dict[str, Any]] = []
    init = stages.get("init")
    if init:
        m0 = init["m0"]
        models.append({"model": "M0", "trained_on": "(SmolLM2-135M-Instruct)", "rows": m0["benchmarks"],
                       "judge": m0["judge"], "seconds": {"eval": m0.get("eval_s")}})  # fmt: skip
    arms = (("self", "self-judged"), ("oracle", "ORACLE-judged (ablation)"))
    for arm, label in arms:
        run = stages.get(arm)
        if not run:
            continue
        state = run["state"]
        if not any(m["model"] == "M1" for m in models) and _eval(state, 0):
            first = _eval(state, 0)
            models.append({"model": "M1", "trained_on": "init SFT (IFT + EFT)", "rows": first["rows"],
                           "judge": first.get("judge"), "seconds": {"eval": first.get("seconds")}})  # fmt: skip
        for k in sorted(int(x) for x in state["iterations"] if int(x) > 0):
            done = _eval(state, k)
            if done is None:
                continue
            name = f"M{k + 1}" if arm == "self" else f"M{k + 1} oracle"
            search, train = state["iterations"][str(k)].get("search", {}), state["iterations"][str(k)].get("train", {})
            previous = "M1" if k == 1 else f"M{k}"
            models.append({"model": name, "baseline": previous, "trained_on": f"{previous}'s {label} pairs",
                           "rows": done["rows"], "judge": done.get("judge"), "pair_precision": done.get("pair_precision"),
                           "pairs": search.get("pairs_total"),
                           "seconds": {"search": search.get("seconds"), "search+train": train.get("seconds"),
                                       "eval": done.get("seconds")}})  # fmt: skip
    for control, (arm, name) in CONTROLS.items():
        if rnd := stages.get(control):
            models.append({"model": name, "baseline": "M1", "trained_on": f"M1 + the {arm} run's candidates, random preferences",
                           "rows": rnd["scores"]["benchmarks"], "judge": rnd["scores"]["judge"],
                           "pair_precision": rnd.get("pair_precision"), "pairs": rnd["num_pairs"],
                           "seconds": {"train": rnd.get("train_s"), "eval": rnd["scores"].get("eval_s")}})  # fmt: skip
    return models, stages


def _by_name(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in models}


def _row(model: dict[str, Any] | None) -> dict[str, Any] | None:
    return model["rows"][0] if model and model["rows"] else None


def _diff_line(models: dict[str, dict[str, Any]], a: str, b: str) -> tuple[str, float | None]:
    """`a` against `b` on the same problems: accuracy difference and exact McNemar (the line, and its p-value
    when the test ran)."""
    ra, rb = _row(models.get(a)), _row(models.get(b))
    if ra is None or rb is None or ra.get("problems_digest") != rb.get("problems_digest"):
        return f"- {a} vs {b}: not both measured on the same problems.", None
    test = mcnemar([x == "1" for x in rb["boxed_bits"]], [x == "1" for x in ra["boxed_bits"]])
    delta = 100 * (ra["accuracy_boxed"] - rb["accuracy_boxed"])
    return ((f"- {a} vs {b}: {pct(ra['accuracy_boxed'])}% vs {pct(rb['accuracy_boxed'])}% = {delta:+.1f} points on "
            f"{ra['n']} problems; {test.only_after} problems only {a} solves, {test.only_before} only {b}; exact "
            f"McNemar p = {format_p(test.p_value)} ({'p < 0.05' if test.p_value < 0.05 else 'not significant at 0.05'})."),
            test.p_value)  # fmt: skip


def _tests_run(tested: list[tuple[str, float]]) -> str:
    """How many tests the p-values above come from, and which survive a Bonferroni correction over them: a
    reader weighing one p < 0.05 needs to know how many chances it had."""
    if not tested:
        return "No test ran (no two models were measured on the same problems)."
    bound = 0.05 / len(tested)
    held = [name for name, p in tested if p < bound]
    return (
        f"Tests run: {len(tested)} exact McNemar tests (the lines above; the results table's McNemar column "
        f"repeats those against each model's baseline). Each p-value is the test's own, unadjusted; over "
        f"{len(tested)} tests a family-wise 0.05 (Bonferroni) needs p < {bound:.4f}: "
        + (", ".join(held) + " " + ("holds" if len(held) == 1 else "hold") if held else "none holds")
        + "."
    )


def _model_table(models: list[dict[str, Any]], key: str, header: list[str],
                 cells: Callable[[dict[str, Any], dict[str, Any]], list[str]]) -> list[str]:  # fmt: skip
    """A Markdown table: `header`, then `cells(model, model[key])` for every model that has a `key` record."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells(m, m[key])) + " |" for m in models if m.get(key)]


def _precision_table(models: list[dict[str, Any]]) -> list[str]:
    header = ["pairs of", "pairs", "precision % [95% CI]", "random pick %", "CI excludes random pick", "reversed"]
    return _model_table(models, "pair_precision", header, lambda m, p: [
        f"{m['trained_on']} (-> {m['model']})", str(p["num_pairs"]), pct(p["precision"], p["precision_ci95"]),
        pct(p["random_pick"]), "yes, above" if p["above_random"] else "no", str(p["num_reversed"])])  # fmt: skip


def _judge_table(models: list[dict[str, Any]]) -> list[str]:
    # Pair accuracy first: the headline (tables.judge_cells says why); single judgments and position bias beside it.
    header = ["model", "mode", "pairs", "pair accuracy (both orders) % [95% CI]", "judgments",
              "judgment accuracy % [95% CI]", "share A %"]  # fmt: skip
    return _model_table(models, "judge", header, lambda m, j: [
        m["model"], j.get("mode", ""), str(j["num_pairs"]), pct(j["pair_accuracy"], j["pair_accuracy_ci95"]),
        str(j["num_judgments"]), pct(j["accuracy"], j["accuracy_ci95"]), pct(j["share_a"])])  # fmt: skip


def _arm_seconds(run: dict[str, Any]) -> float:
    """A loop arm's time: its wall time, or the sum of its stages' seconds when taken from another run."""
    return float(run["seconds"] if run.get("taken_from") else run["wall_s"])


def _times(stages: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| stage | wall s | peak memory GiB (PSS, process tree) | detail |", "|---|---|---|---|"]
    init = stages.get("init")
    if init:
        detail = ", ".join(f"{k} {v:.0f} s" for k, v in init["result"]["seconds"].items())
        lines.append(f"| init (M0 -> M1, cached) | {init['wall_s']:.0f} | {init['peak_gib']:.1f} | {detail} |")
    for arm in ("self", "oracle"):
        run = stages.get(arm)
        if run:
            parts = []
            for k, it in sorted(run["state"]["iterations"].items(), key=lambda x: int(x[0])):
                bits = [f"{s} {it[s].get('seconds', it[s].get('verify_seconds', 0)):.0f} s" for s in
                        ("search", "train", "sync", "eval") if s in it]  # fmt: skip
                parts.append(f"iteration {k}: " + ", ".join(bits))
            taken = f"; stage seconds of the run in {run['taken_from']}" if run.get("taken_from") else ""
            lines.append(f"| loop, {arm} judge | {_arm_seconds(run):.0f} | {run['peak_gib']:.1f} | {'; '.join(parts)} "
                         f"(train = search + step-DPO, overlapped){taken} |")  # fmt: skip
    for control, (arm, _) in CONTROLS.items():
        if rnd := stages.get(control):
            lines.append(f"| random-preference control on the {arm} run's candidates | {rnd['wall_s']:.0f} | "
                         f"{rnd['peak_gib']:.1f} | step-DPO {rnd['train_s']:.0f} s, eval {rnd['scores']['eval_s']:.0f} s |")  # fmt: skip
    if init and stages.get("self"):
        run = stages["self"]
        built = float(init["result"]["seconds"].get("total", init["wall_s"]))  # a cached init's time to build it
        lines.append(f"| = `psr-ray run` (`make run`): init + the self-judged loop, the same code and config | "
                     f"{built + _arm_seconds(run):.0f} | {max(init['peak_gib'], run['peak_gib']):.1f} | "
                     "the init's build time (not its cached reuse) plus the loop's |")  # fmt: skip
    mc = stages.get("mc")
    if mc:
        lines.append(
            f"| Monte-Carlo oracle check | {mc['wall_s']:.0f} | | {mc['num_items']} steps x {mc['num_rollouts']} rollouts |"
        )
    return lines


def write_fidelity_report(work: Path, out: Path, *, command: str, machine: str) -> None:
    models, stages = build_models(work)
    by_name = _by_name(models)
    init = stages.get("init", {}).get("result", {})
    lines = ["# Fidelity: does PSR measurably improve the model? (embedded CPU run)", "",
             f"Command: `{command}` (stages recorded in `{work}`). Machine: {machine}. Every figure below is computed "
             "by bench/fidelity.py from its stage records; see bench/fidelity.py's docstring for what each stage runs.", "",
             "## Accuracy, judge pair accuracy, pair precision", "", format_run_table(models), "",
             "Boxed = the paper's rule (last `\\boxed{}` answer); lenient = boxed, else \"the answer is\", else the last "
             "number. McNemar: exact two-sided, against the model named (+: problems only this model solves, -: only "
             "the other). The ORACLE-judged model is an ablation: the exact step check replaced the self-judge.", "",
             "## The targets", ""]  # fmt: skip
    tested = []
    for a, b in COMPARISONS:
        if a in by_name and b in by_name:
            line, p_value = _diff_line(by_name, a, b)
            lines.append(line)
            if p_value is not None:
                tested.append((f"{a} vs {b}", p_value))
    lines += ["", _tests_run(tested), "", "## Pair precision (oracle labels of the pairs a model was trained on)", "", *_precision_table(models),
              "", "## Judge pair accuracy on held-out oracle-labelled pairs (M1's candidates, both orders)", "",
              *_judge_table(models), ""]  # fmt: skip
    if init:
        e, shares = init["eft_counts"], init["loss_shares"]
        lines += ["## Initialization", "",
                  f"EFT:IFT = {init['num_eft_rows']}:{init['num_ift_rows']} rows = {init['eft_ift_ratio']:.3f} (the "
                  f"paper's ~4.2k:28.9k = {init['paper_eft_ift_ratio']:.3f}). EFT pairs: {init['num_eft_pairs']} of "
                  f"init.num_eft_pairs={init['configured_eft_pairs']}, from M_ift's own candidates (M0 after an "
                  f"IFT-only SFT of {len(init['ift_train_metrics'])} optimizer steps; {e.get('candidates')} candidates "
                  f"at {e.get('sites')} steps, {e.get('own_sites')} of them after M_ift's own steps, {e.get('right')} "
                  f"right by the exact check). SFT loss shares (rows weigh alike): "
                  + ", ".join(f"{k.upper()} {100 * v['rows']:.1f}% (per-token: {100 * v['tokens']:.1f}%)"
                              for k, v in shares.items())
                  + f". Held-out judge pairs: {init['num_heldout_pairs']} from M1's candidates. SFT (M0 -> M1): "
                  f"{len(init['train_metrics'])} optimizer steps.", ""]  # fmt: skip
    mc = stages.get("mc")
    if mc:
        lines += ["## The Monte-Carlo oracle against the exact check", "",
                  f"{mc['num_items']} distinct stored candidates of the oracle run, {mc['num_rollouts']} rollouts of M1 "
                  f"each (right = any rollout reaches the answer): agreement {mc['agree']}/{mc['num_items']}; exact right: "
                  f"MC right {mc['exact_right_mc_right']}, MC wrong {mc['exact_right_mc_wrong']}; exact wrong: MC right "
                  f"{mc['exact_wrong_mc_right']}, MC wrong {mc['exact_wrong_mc_wrong']}. Mean MC value: "
                  f"{_fmt(mc['mean_value_exact_right'])} (exact right) vs {_fmt(mc['mean_value_exact_wrong'])} (exact wrong).", ""]  # fmt: skip
    lines += ["## Wall time on this machine", "", *_times(stages), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    plot_models([{k: v for k, v in m.items()} for m in models], out.with_suffix(".png"))
    print(out.read_text())


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


__all__ = ["build_models", "compare", "write_fidelity_report"]
