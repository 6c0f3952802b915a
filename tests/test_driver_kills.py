"""Fault tolerance, measured (issue 15): the real CLI on the suite's Ray cluster with the real tiny engines and
ZeRO-3 trainer (tests/scenarios/driver_kills.py). The driver SIGKILLed inside every named window and resumed, and
a trainer worker SIGKILLed after a confirmed step: every run must end with the undisturbed run's pairs, ids and
content, each trained once, and every engine on the final policy. Engine kills: tests/test_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scenarios import driver_kills as dk
from tests.scenarios import faults as fi

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("driver_kills")
    return work, dk.write_inputs(tiny_model_dir, work, ray_cluster.get_runtime_context().gcs_address)


@pytest.fixture(scope="module")
def undisturbed(tiny_run):
    work, tiny = tiny_run
    launch = dk.finish(tiny, work / "base", work / "kill")
    return launch, dk.outcome(work / "base")


# Each launch of the chain resumes the last one and is killed in the next window (window@N counts within the
# launch's process); launch 4 also SIGKILLs a trainer worker after its first confirmed optimizer step.
CHAIN = [
    ("search.before_flush@1", None),
    ("search.after_flush@1", None),
    ("train.after_step@1", None),
    ("sync.after_push@1", "train.after_step@1"),
    ("checkpoint.persist@1", None),
    ("state.write@3", None),  # this launch's writes: config, iteration 1's search, its train record
    ("eval@1", None),  # iteration 0's eval is done: the first eval of this launch is iteration 1's
]


@pytest.fixture(scope="module")
def chain(tiny_run):
    """The driver SIGKILLed in each window in turn, each kill resumed by the next launch; what was on disk
    right after each kill is kept for the checks below."""
    from psr_ray.data.pairs_io import pairs_dir, read_manifest

    work, tiny = tiny_run
    out, kill_dir = work / "chain", work / "kill"
    seen = []
    for i, (driver, worker) in enumerate(CHAIN):
        launch = dk.launch(tiny, out, kill_dir, driver=driver, worker=worker, resume=i > 0)
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else None
        checkpoints = sorted(p.parent for p in (out / "checkpoints").rglob("checkpoint_info.json"))
        seen.append({
            "launch": launch,
            "state": state,
            "manifest": read_manifest(pairs_dir(str(out), 1)),
            "checkpoints": {str(c): (c / "policy_version.json").is_file() for c in checkpoints},
            "state_tmp": (out / "state.json.tmp").is_file(),
        })  # fmt: skip
    final = dk.finish(tiny, out, kill_dir, resume=True)
    return seen, final, dk.outcome(out)


def test_undisturbed_run(undisturbed, tiny_run):
    launch, base = undisturbed
    assert launch.returncode == 0
    assert base.num_rows == len(base.pairs) == base.committed == 12  # 4 problems x 3 steps
    assert base.trained == base.committed  # every committed pair trained once
    assert base.sync_versions == [2, 2] and base.eval_version == base.final_version == 2
    for line, reason in dk.BAD_LINE_REASONS.items():  # bad JSONL lines skipped, counted, with their numbers
        assert f"skipped line {line}: {reason}" in launch.log


def test_each_kill_landed_in_its_window(chain):
    seen, _, _ = chain
    fired = [{w: info["pid"] for w, info in s["launch"].fired.items()} for s in seen]
    driver_pids = [s["launch"].pid for s in seen]
    assert [s["launch"].returncode for s in seen] == [None] * len(CHAIN)  # all SIGKILLed
    by_window = {spec.partition("@")[0]: (i, spec) for i, (spec, _) in enumerate(CHAIN)}

    def at(window: str) -> dict:
        return seen[by_window[window][0]]

    # Search windows: killed in the driver, before its first part / right after one, the search unfinished.
    assert fired[0]["search.before_flush"] == driver_pids[0] and at("search.before_flush")["manifest"]["parts"] == []
    after = at("search.after_flush")["manifest"]
    assert fired[1]["search.after_flush"] == driver_pids[1]
    assert len(after["parts"]) == 1 and not after["complete"] and len(after["done_problems"]) < 4
    # Train: a worker (not the driver) after a step; no checkpoint is complete.
    assert fired[2]["train.after_step"] != driver_pids[2] and not any(at("train.after_step")["checkpoints"].values())
    # Launch 4: a worker killed after a step, then the driver after the push, which only a restarted worker
    # group that finished training can reach.
    assert set(fired[3]) == {"train.after_step", "sync.after_push"}
    assert fired[3]["train.after_step"] != fired[3]["sync.after_push"] != driver_pids[3]
    # Persist: the checkpoint's files are there, its marker is not: it must never be resumed from.
    persisted = at("checkpoint.persist")["checkpoints"]
    assert persisted and not any(persisted.values())
    # state.json write: the new file fsynced under its temp name, the old one in place (no train record).
    write = at("state.write")
    assert write["state_tmp"] and "train" not in write["state"]["iterations"]["1"]
    assert any(write["checkpoints"].values())  # the checkpoint it would have recorded is complete
    # Eval: generated and scored, not recorded.
    assert "sync" in at("eval")["state"]["iterations"]["1"] and "eval" not in at("eval")["state"]["iterations"]["1"]


def test_every_kill_resumes_to_the_undisturbed_pairs_trained_once_on_the_final_policy(chain, undisturbed):
    seen, final, result = chain
    _, base = undisturbed
    assert final.returncode == 0 and "resuming" in final.log
    diff = dk.compare_runs(base, result)
    assert diff == {"problems_lost": 0, "pairs_lost": 0, "pairs_extra": 0, "pairs_duplicated": 0,
                    "pairs_changed": 0, "trained_minus_committed": 0, "engines_at_final_version": True}  # fmt: skip
    assert result.pairs == base.pairs  # ids and every column
    assert result.trained == result.committed == base.committed
    assert dk.recovered(diff, finished=True)
    # Iteration 0's eval was recorded once, by the first launch, and never redone.
    assert result.state["iterations"]["0"] == seen[1]["state"]["iterations"]["0"]


def test_a_resumed_run_refuses_a_second_driver_and_other_settings(chain, tiny_run):
    work, tiny = tiny_run
    refused = dk.launch(tiny, work / "chain", work / "kill", resume=True, overrides=("trainer.beta=0.1",))
    assert refused.returncode == 1 and "trainer.beta cannot change in a resumed run" in refused.log


def test_zero_pairs_fail_the_iteration_loudly(tiny_run, undisturbed):
    """Every verdict garbage (explain mode on the random model): every problem abandoned, no pair. The run
    stops with the reason instead of training zero steps and bumping the policy version."""
    work, tiny = tiny_run
    out = work / "no_pairs"
    done = dk.launch(tiny, out, work / "kill", overrides=("judge.mode=explain", "judge.max_explanation_tokens=8",
                                                          "search.max_rollbacks=1"))  # fmt: skip
    assert done.returncode == 1 and len(done.error_lines) == 1
    (line,) = done.error_lines
    assert line.startswith("psr-ray run: iteration 1 produced no step pairs: 4 of 4 problems were abandoned after")
    assert "nothing to train on, so the policy stays at version 1" in line
    state = json.loads((out / "state.json").read_text())
    assert "train" not in state["iterations"].get("1", {})
    assert not list((out / "checkpoints").rglob("policy_version.json"))  # no version 2 anywhere


def test_a_trainer_error_stops_the_search_at_once(tiny_run, undisturbed, tmp_path):
    """A corrupt checkpoint under the iteration's folder fails the trainer as it starts: the run ends then,
    not after the search, with the trainer's error on one line."""
    from psr_ray.data.pairs_io import pairs_dir, read_manifest

    work, tiny = tiny_run
    out = work / "trainer_error"
    good = next((work / "base" / "checkpoints").rglob("policy_version.json")).parent
    fi.corrupt_checkpoint(good, out / "checkpoints" / "iter_1" / "planted")
    done = dk.launch(tiny, out, work / "kill")
    assert done.returncode == 1 and len(done.error_lines) == 1
    (line,) = done.error_lines
    assert (
        line.startswith(f"psr-ray run: checkpoint {out}/checkpoints/iter_1/planted is corrupt: ")
        and "unreadable" in line
    )
    manifest = read_manifest(pairs_dir(str(out), 1))
    assert "SearchStopped" in manifest["error"] and len(manifest["done_problems"]) < 4


def test_resume_from_a_corrupt_checkpoint_is_one_line(tiny_run, undisturbed, tmp_path):
    """A real checkpoint (the undisturbed run's) with garbage weights: check_checkpoint names the damage and
    `--resume` refuses it before starting anything."""
    import shutil

    from psr_ray.trainer import checkpoint as ckpt

    work, tiny = tiny_run
    good = next((work / "base" / "checkpoints").rglob("policy_version.json")).parent
    assert ckpt.check_checkpoint(good) == good
    run = tmp_path / "run"
    shutil.copytree(work / "base", run, ignore=shutil.ignore_patterns(".psr-ray.lock"))
    state = json.loads((run / "state.json").read_text())
    bad = Path(state["iterations"]["1"]["train"]["hf_dir"].replace(str(work / "base"), str(run))).parent
    for file in (bad / "hf").glob("*.safetensors"):
        size = file.stat().st_size
        file.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ValueError, match=rf"corrupt: hf/model\.safetensors has 64 bytes, the marker recorded {size}; "
                       r"model\.safetensors unreadable"):  # fmt: skip
        ckpt.check_checkpoint(bad)
    del state["iterations"]["1"]["sync"], state["iterations"]["1"]["eval"]
    state["iterations"]["1"]["train"]["hf_dir"] = str(bad / "hf")
    state["config"]["run"]["output_dir"] = str(run)
    (run / "state.json").write_text(json.dumps(state))
    done = dk.launch(tiny, run, work / "kill", resume=True)
    assert done.returncode == 1 and len(done.error_lines) == 1
    assert done.error_lines[0].startswith(f"psr-ray run: checkpoint {bad} is corrupt: ")
    assert "Traceback" not in done.log
