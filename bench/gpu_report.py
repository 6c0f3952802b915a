"""bench/gpu_check.py's results.jsonl -> a markdown report: device, versions, and every figure computed from the
JSON (nothing typed in). gpu_check writes one to its $OUT/gpu.md after every run; after a real GPU run, this
writes bench/results/gpu.md from the fetched folder (a dry run's results are refused there):

    python bench/gpu_report.py <files_at>/results.jsonl [--out bench/results/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def read_lines(path: Path) -> dict[str, dict[str, Any]]:
    """The last line of each phase."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["phase"]: line for line in lines}


def render(lines: dict[str, dict[str, Any]]) -> str:
    dry = any(line.get("dry_run") for line in lines.values())
    ended = max(line.get("ended_unix_s", 0) for line in lines.values())
    imports = _result(lines, "imports")
    device = imports.get("device", "unknown (the imports phase did not run)")
    memory = (
        f", {imports['memory_gib']} GiB, compute capability {imports['capability']}" if "memory_gib" in imports else ""
    )
    out = [
        "# GPU check (bench/gpu_check.py)\n",
        f"{'DRY RUN on CPU: no figure here says anything about a GPU. ' if dry else ''}Device: {device}{memory}; "
        f"run ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(ended))}. Written by bench/gpu_report.py from "
        "the run's results.jsonl.\n",
        "## Phases\n",
        "| phase | status | seconds | budget s | error (last line) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, line in lines.items():
        error = (line.get("error") or "").strip().splitlines()
        out.append(f"| {name} | {line['status']} | {line.get('seconds', 0):.1f} | {line.get('budget_s', 0):g} | "
                   f"{error[-1][:160].replace('|', '/') if error else ''} |")  # fmt: skip
    if imports:
        out += ["\n## Versions\n", f"Python {imports.get('python')}, torch CUDA {imports.get('torch_cuda', '-')}.\n",
                "| module | version |", "| --- | --- |"]  # fmt: skip
        out += [f"| {name} | {version or 'FAILED'} |" for name, version in imports.get("modules", {}).items()]
    out += _model(_result(lines, "model")) + _engines(_result(lines, "engines")) + _train(_result(lines, "train"))
    out += _sync(_result(lines, "sync"))
    return "\n".join(out) + "\n"


def _result(lines: dict[str, dict[str, Any]], phase: str) -> dict[str, Any]:
    return lines.get(phase, {}).get("result") or {}


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _model(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    return ["\n## Model\n", f"Random-init Qwen2, {r['shape']} shape: {_count(r['params'])} parameters "
            f"({r['params']:,}), {r['dtype']}, vocab {r['vocab_size']} ({r['tokenizer']}), {r['bytes'] / 1e9:.2f} GB "
            f"of safetensors; logits sharpened to a spread of {r['logit_std']} nats (std over the vocabulary)."]  # fmt: skip


def _engines(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    starts = ", ".join(f"{role} {s:.1f} s" for role, s in r["start"].items())
    out = ["\n## Engines: propose and judge\n", f"Engine start (RunSession.start_pool, one after the other): {starts}.\n",
           "| call | requests | generated tokens | seconds | tokens/s |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    out += [f"| {name} | {c['requests']} | {c['tokens']} | {c['seconds']:.2f} | {c['tokens_per_s']:.1f} |"
            for name, c in r["calls"].items()]  # fmt: skip
    out.append(f"\nVerdicts, direct: {r['verdicts_direct']}; explain: {r['verdicts_explain']} (a random model).")
    return out


def _train(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a (no bf16 peak for this device)"
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in r.get("worker_phases_s", {}).items())
    return [
        "\n## Trainer: ZeRO-3 step-DPO (train_dpo, one Ray Train worker)\n",
        "| params | rows x tokens | steps | steady tokens/s | TFLOP/s (8N) | MFU | start-up s | teardown s | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {_count(r['params'])} | {r['rows_x_tokens']} | {r['steps']} | {r['steady_tokens_per_s']:.1f} | "
        f"{r['tflops']:.3f} | {mfu} | {r['startup_s']:.1f} | {r['teardown_s']:.1f} | {r['fit_s']:.1f} |",
        f"\nFLOPs per token 8N = {r['flops_per_token']:.3g} (policy fwd+bwd 6N, reference fwd 2N); peak "
        f"{r['peak_flops'] or 'n/a'}. Steady rate over steps 2..{r['steps']} (step seconds {r['step_s']}). "
        f"Loss {r['losses'][0]} -> {r['losses'][-1]}. Worker phases: {phases or 'n/a'}. Held-out: {r['heldout']}.",
    ]


def _sync(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    honest, failed = r["honest"], r["forced_failure"]
    seen = list(honest["probe_errors"].values()) + list(r["initial_distance"])
    worst = max(seen) if seen else float("nan")
    first_error = (failed.get("error") or "").strip().splitlines()
    return [
        f"\n## Weight sync ({r['backend']}) into the engines, verified by the probe\n",
        "| bytes | tensors | engines | seconds | GB/s | copy bound GB/s | x bound | verify s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {honest['num_bytes'] / 1e9:.3f} GB | {honest['num_tensors']} | {honest['num_engines']} | "
        f"{honest['seconds']:.3f} | {honest['gbytes_per_s']:.2f} | {r['copy_gbps']:.2f} | "
        f"{r['copy_gbps'] / honest['gbytes_per_s']:.1f} | {honest['verify_seconds']:.2f} |",
        f"\nWeights sent: the {r['source']} policy (largest change from the initial weights {r['max_weight_change']:.3g}); "
        f"sync {'verified and committed' if honest['error'] is None else 'FAILED: ' + str(honest['error'])}; "
        f"policy versions after it {r['versions']}.\n",
        f"**Probe distance of honest engines (defect 4)**: after the sync {honest['probe_errors']}; engines loaded "
        f"from disk {[round(x, 5) for x in r['initial_distance']]}. Largest {worst:.4g} against the tolerance "
        f"{honest['tolerance']:g}: {honest['tolerance'] / worst if worst else float('inf'):.1f}x headroom.\n",
        f"**Forced probe failure**: {'committed (WRONG)' if failed['error'] is None else 'failed and rolled back'}; "
        f"probe errors {failed['probe_errors']}; versions after {r['versions_after_rollback']}, states {r['states']}; "
        f"answers {r['restored_distance']} from the trained weights' answers before it. Its error: "
        f"`{first_error[0][:300] if first_error else ''}`",
    ]


def write_report(results: Path, out: Path) -> str:
    """Renders `results` to `out`; a dry run's results are refused under bench/results."""
    lines = read_lines(results)
    if any(line.get("dry_run") for line in lines.values()) and out.resolve().is_relative_to(RESULTS):
        raise SystemExit(f"{results} is a dry run's: its report goes beside it, never to {RESULTS}")
    text = render(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.jsonl written by bench/gpu_check.py")
    parser.add_argument("--out", default=str(RESULTS / "gpu.md"))
    args = parser.parse_args()
    write_report(Path(args.results), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
