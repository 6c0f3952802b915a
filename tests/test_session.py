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


def test_phase_engines_fill_this_machines_cores_only_on_a_local_cluster_of_cpu_engines(monkeypatch):
    from psr_ray.pipeline.session import phase_engine_count

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = C.load([], ["rollout.num_engines=1", "judge.num_engines=0"])
    assert phase_engine_count(one, 2) == 2  # the embedded run's one engine would leave a core idle
    assert phase_engine_count(one, 1) == 1
    assert phase_engine_count(C.load([], ["rollout.num_engines=2", "judge.num_engines=1"]), 2) == 3  # never fewer
    assert phase_engine_count(C.load([], ["rollout.num_engines=1", "judge.num_engines=0",
                                          "rollout.num_cpus_per_engine=2"]), 8) == 4  # fmt: skip
    assert phase_engine_count(C.load([], ["rollout.num_engines=1", "judge.num_engines=0", "run.ray_address=auto"]),
                              16) == 1  # fmt: skip  # a cluster's engines are as configured
    gpu = C.load([], ["rollout.num_engines=1", "judge.num_engines=0", "rollout.num_gpus_per_engine=1"])
    assert phase_engine_count(gpu, 16) == 1
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # a submitted job
    assert phase_engine_count(one, 2) == 1
