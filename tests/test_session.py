"""The one start-up (psr_ray/pipeline/session.py): the run folder's lock, the problems with their console
report, the model resolved once, durable commit points, and the init's per-phase engines refusing names that
a running run holds."""

from __future__ import annotations

import os

import pytest

from psr_ray import config as C
from psr_ray.pipeline.session import RunSession


def test_problems_are_reported_line_by_line_and_an_empty_source_fails(tmp_path, capsys):
    source = tmp_path / "p.jsonl"
    source.write_text('{"question": "What is 2+3?", "answer": "5"}\nnot json\n{"question": "", "answer": "1"}\n'
                      '{"question": "What is 1+1?", "answer": "2"}\n')  # fmt: skip
    session = RunSession(C.load([], [f"data.source={source}"]))
    assert sorted(p.question for p in session.load_problems()) == ["What is 1+1?", "What is 2+3?"]
    assert capsys.readouterr().out.splitlines() == [
        f"[psr_ray] {source}: 2 problems, 2 skipped (1 empty question, 1 invalid JSON)",
        "[psr_ray]   skipped line 2: invalid JSON: Expecting value at column 1",
        "[psr_ray]   skipped line 3: empty question",
    ]
    assert len(session.load_problems(limit=1)) == 1

    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    with pytest.raises(ValueError, match=rf"^data.source '{empty}' yielded no usable problems$"):
        RunSession(C.load([], [f"data.source={empty}"])).load_problems()


def test_the_locked_folder_excludes_a_second_session_until_released(tmp_path):
    cfg = C.PSRConfig()
    session = RunSession.locked(cfg, tmp_path / "run", command="generate")
    session.check_writable("--output")
    with pytest.raises(ValueError, match=r"is in use by another psr-ray process \(.*\"command\": \"generate\""):
        RunSession.locked(cfg, tmp_path / "run")
    session.release()
    RunSession.locked(cfg, tmp_path / "run").release()
    with pytest.raises(AssertionError):
        RunSession(cfg).check_writable()  # no folder: nothing to check


def test_the_model_is_resolved_once_and_the_tokenizer_loaded_on_first_use(tiny_model_dir):
    session = RunSession(C.load([], [f"model.path={tiny_model_dir}"]))
    assert "tokenizer" not in vars(session)  # nothing loaded until asked for
    assert session.model_path == os.path.realpath(tiny_model_dir)
    assert session.tokenizer is session.tokenizer
    assert session.tokenizer("Step 1:")["input_ids"]


def test_a_commit_point_is_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "init.json"
    RunSession.commit(path, "old\n")
    RunSession.commit(path, '{"done": true}\n')
    assert path.read_text() == '{"done": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.json"]


@pytest.mark.ray
def test_phase_engines_refuse_names_a_running_run_holds(ray_cluster, tmp_path):
    """The init's per-phase engines never borrow or stop another run's engines of the same name."""

    @ray_cluster.remote
    class Stand:
        def ping(self) -> str:
            return "alive"

    other = Stand.options(name="psr-rollout-0").remote()
    try:
        assert ray_cluster.get(other.ping.remote()) == "alive"
        session = RunSession(C.load([], ["rollout.num_engines=1", "judge.num_engines=1"]))
        with pytest.raises(ValueError, match=r"^engines \['psr-rollout-0'\] are already running in this Ray "
                                             r"namespace; stop that run first$"):  # fmt: skip
            with session.temporary_engines("rollout", "unused: no engine is started", 1):
                pass
        assert ray_cluster.get(other.ping.remote()) == "alive"  # left running
    finally:
        ray_cluster.kill(other)


def test_phase_engines_share_this_machines_cores_only_on_a_local_cluster_of_cpu_engines(monkeypatch):
    from psr_ray.engines.actor import engine_env, engine_settings
    from psr_ray.pipeline.session import temporary_engine_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = C.load([], ["rollout.num_engines=1", "judge.num_engines=0"])
    assert temporary_engine_cpus(cfg, 1, 2) == 2.0  # the embedded run's one engine: both cores, not one
    assert temporary_engine_cpus(cfg, 2, 2) == 1.0 and temporary_engine_cpus(cfg, 3, 2) == 1.0  # never below 1
    assert temporary_engine_cpus(C.load([], ["rollout.num_cpus_per_engine=4"]), 2, 2) == 4.0  # never below config
    assert temporary_engine_cpus(C.load([], ["run.ray_address=auto"]), 1, 16) is None  # a cluster: as configured
    assert temporary_engine_cpus(C.load([], ["rollout.num_gpus_per_engine=1"]), 1, 16) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # a submitted job
    assert temporary_engine_cpus(cfg, 1, 2) is None
    # The engine's torch threads follow its CPUs (whole ones); a GPU engine's are left to vLLM.
    two = C.load([], ["rollout.num_cpus_per_engine=2"])
    assert engine_env(engine_settings(two, "rollout", "m"))["OMP_NUM_THREADS"] == "2"
    assert engine_env(engine_settings(C.load([], ["rollout.num_cpus_per_engine=0.5"]), "rollout", "m"))[
        "OMP_NUM_THREADS"] == "1"  # fmt: skip
    gpu = C.load([], ["rollout.num_gpus_per_engine=1"])
    assert "OMP_NUM_THREADS" not in engine_env(engine_settings(gpu, "rollout", "m"))
