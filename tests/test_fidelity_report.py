"""bench/fidelity.py's report stage on small hand-made stage records (no model is run): every table row comes
from a record, and a model without a record is left out of that table. The bench script runs as a user runs
it (a subprocess), since tests never import bench/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def eval_row(bits: str) -> dict:
    accuracy = bits.count("1") / len(bits)
    return {"iteration": 0, "benchmark": "arith", "n": len(bits), "accuracy_boxed": accuracy, "accuracy": accuracy,
            "boxed_bits": bits, "lenient_bits": bits, "problems_digest": "d"}  # fmt: skip


def judge(accuracy: float, num: int) -> dict:
    return {"accuracy": accuracy, "accuracy_ci95": [0.3, 0.9], "num_judgments": num, "num_pairs": num // 2,
            "pair_accuracy": 0.5, "pair_accuracy_ci95": [0.2, 0.8], "share_a": 0.375, "mode": "direct"}  # fmt: skip


def write_stages(work: Path) -> None:
    init = {"m0": {"benchmarks": [eval_row("0000")], "judge": judge(0.625, 8), "eval_s": 40},
            "result": {"seconds": {"sft": 85}, "eft_counts": {"candidates": 12, "sites": 4, "right": 3},
                       "num_eft_rows": 2, "num_ift_rows": 14, "eft_ift_ratio": 2 / 14, "num_eft_pairs": 1,
                       "configured_eft_pairs": 4, "paper_eft_ift_ratio": 4200 / 28900, "ift_train_metrics": [{}],
                       "loss_shares": {"ift": {"rows": 0.875, "tokens": 0.99}, "eft": {"rows": 0.125, "tokens": 0.01}},
                       "num_heldout_pairs": 4, "train_metrics": [{}, {}]},
            "wall_s": 250, "peak_gib": 9.1}  # fmt: skip
    precision = {"precision": 0.5, "precision_ci95": [0.2, 0.8], "random_pick": 0.25, "num_pairs": 6,
                 "num_reversed": 1, "above_random": False}  # fmt: skip
    iterations = {
        "0": {"eval": {"rows": [eval_row("1000")], "judge": None, "seconds": 30}},
        "1": {"search": {"pairs_total": 6, "seconds": 20}, "train": {"seconds": 50}, "sync": {"verify_seconds": 2},
              "eval": {"rows": [eval_row("1100")], "judge": judge(0.75, 8), "pair_precision": precision, "seconds": 30}},
    }  # fmt: skip
    (work / "stage_init.json").write_text(json.dumps(init))
    (work / "stage_self.json").write_text(
        json.dumps({"state": {"iterations": iterations}, "wall_s": 300, "peak_gib": 11.0})
    )
    # The self arm's own control: random preferences on its candidates.
    control = {"arm": "self", "num_pairs": 6, "pair_precision": precision | {"precision": 0.25, "num_reversed": 3},
               "scores": {"benchmarks": [eval_row("0100")], "judge": judge(0.5, 8), "eval_s": 20},
               "train_s": 40, "wall_s": 70, "peak_gib": 8.5}  # fmt: skip
    (work / "stage_random-self.json").write_text(json.dumps(control))


def test_report_tables_come_from_the_stage_records(tmp_path):
    write_stages(tmp_path)
    out = tmp_path / "report" / "fidelity.md"
    env = os.environ | {"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, "bench/fidelity.py", "--stage", "report", "--work", str(tmp_path), "--out", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = out.read_text().splitlines()
    assert out.with_suffix(".png").is_file()

    def table(title: str) -> list[str]:
        start = lines.index(title) + 2
        return lines[start : lines.index("", start)]

    assert table("## Pair precision (oracle labels of the pairs a model was trained on)") == [
        "| pairs of | pairs | precision % [95% CI] | random pick % | CI excludes random pick | reversed |",
        "|---|---|---|---|---|---|",
        "| M1's self-judged pairs (-> M2) | 6 | 50.0 [20.0, 80.0] | 25.0 | no | 1 |",
        "| M1 + the self run's candidates, random preferences (-> M2 random (self)) | 6 | 25.0 [20.0, 80.0] | 25.0 "
        "| no | 3 |",
    ]
    # M1 has no judge record (no held-out pairs at iteration 0 here): no row.
    # Pair accuracy over both orders is the headline column; single judgments and the share of "A" beside it.
    assert table("## Judge pair accuracy on held-out oracle-labelled pairs (M1's candidates, both orders)") == [
        "| model | mode | pairs | pair accuracy (both orders) % [95% CI] | judgments | judgment accuracy % [95% CI] "
        "| share A % |",
        "|---|---|---|---|---|---|---|",
        "| M0 | direct | 4 | 50.0 [20.0, 80.0] | 8 | 62.5 [30.0, 90.0] | 37.5 |",
        "| M2 | direct | 4 | 50.0 [20.0, 80.0] | 8 | 75.0 [30.0, 90.0] | 37.5 |",
        "| M2 random (self) | direct | 4 | 50.0 [20.0, 80.0] | 8 | 50.0 [30.0, 90.0] | 37.5 |",
    ]
    results = table("## Accuracy, judge pair accuracy, pair precision")
    assert (
        results[0].startswith("| model | trained on |")
        and "| judge pair acc % [95% CI] | judgment acc % |" in results[0]
    )
    assert "| 50.0 [20.0, 80.0] (n=4) | 75.0 | 37.5 |" in next(r for r in results if r.startswith("| M2 | "))
    assert table("## Initialization")[0].startswith(
        "EFT:IFT = 2:14 rows = 0.143 (the paper's ~4.2k:28.9k = 0.145). EFT pairs: 1 of init.num_eft_pairs=4, "
        "from M_ift's own candidates (M0 after an IFT-only SFT of 1 optimizer steps;"
    )
    assert (
        "SFT loss shares (rows weigh alike): IFT 87.5% (per-token: 99.0%), EFT 12.5% (per-token: 1.0%)."
        in (table("## Initialization")[0])
    )
    assert (
        "- M2 vs M1: 50.0% vs 25.0% = +25.0 points on 4 problems; 1 problems only M2 solves, 0 only M1;"
        in "\n".join(lines)
    )
    # Each claimed arm has its own control, and the number of tests stands beside the p-values.
    targets = table("## The targets")
    assert [t.split(":")[0] for t in targets if t.startswith("- ")] == [
        "- M1 vs M0", "- M2 vs M1", "- M2 random (self) vs M1", "- M2 vs M2 random (self)"
    ]  # fmt: skip
    assert "- M2 vs M2 random (self): 50.0% vs 25.0% = +25.0 points on 4 problems;" in targets[3]
    tests_run = lines[lines.index(targets[-1]) + 2]
    assert tests_run.startswith("Tests run: 4 exact McNemar tests (the lines above;")
    assert tests_run.endswith("over 4 tests a family-wise 0.05 (Bonferroni) needs p < 0.0125: none holds.")
