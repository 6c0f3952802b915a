"""Every bad input named in issue 15 (and its relatives) ends in one exact line on stderr naming the field or
file, exit status 1, no traceback, and nothing lost: the real CLI in a fresh process, as a user runs it.

The cases live in tests/scenarios/bad_input.py (bench/fault_injection.py tabulates them); the ones that need
a special machine state (a full or read-only disk, a held lock, a used output folder, a running `ray start`
head) are set up here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scenarios import bad_input as bi


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def all_cases(work, tiny_model_dir):
    return {case.name: case for case in bi.cases(work, tiny_model_dir)}


_NAMES = [
    "malformed YAML", "duplicate YAML keys", "YAML that is not a mapping", "a section that is not a mapping",
    "config file that does not exist", "config path without --config (taken as the config)",
    "override that is not key=value", "override value that is not YAML", "broken ${ interpolation (override)",
    "broken ${ interpolation (file)", "interpolation of a missing key", "unknown key", "unknown section",
    "wrong type", "trainer.micro_batch_size=0", "trainer.num_workers=0", "learning_rate=inf", "learning_rate=nan",
    "max_step_tokens above the context length", "max_model_len above the model's context", "unknown benchmark name",
    "bad data.split", "ray_address that is no address", "dashboard URL as ray_address", "empty model folder",
    "relative dir/missing model path", "data.source that does not exist", "deeply nested JSONL line",
    "output folder under a file", "--resume of a folder with no run", "--resume of a corrupt state.json",
    "--resume with --config", "--resume with an override that changes results", "generate --num-problems 0",
    "eval --limit -1", "eval --benchmarks with an unknown name", "train --pairs of a missing folder",
    "Ray address where nothing answers", "submit address where nothing answers", "submit address that is no URL",
    "eval --benchmarks with spaces after the commas", "data.source that is a folder", "benchmark path that is a folder",
    "empty .jsonl benchmark", "output_dir that is a file", "a Ray cluster launcher YAML as --config",
    "relative model path of no folder, offline", "model path deeper than org/name", "model folder without a tokenizer",
    "generate with no usable problem", "a --config file that replaces the preset (said, not refused)",
]  # fmt: skip


def test_the_case_list_is_the_one_tested(work, tiny_model_dir):
    assert [case.name for case in bi.cases(work, tiny_model_dir)] == _NAMES


def check(case: bi.BadInput) -> bi.CaseResult:
    result = bi.run_case(case)
    assert not result.traceback, result.stderr[-2000:]
    assert (result.returncode, result.line) == (case.returncode, case.expected), result.stderr[-2000:]
    if case.returncode != 0:
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert case.stdout_has in result.stdout
    return result


# `psr-ray run` cases that get as far as importing the run's stack (torch, transformers): seconds of CPU each.
_SLOW = {"deeply nested JSONL line", "Ray address where nothing answers"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in _NAMES])
def test_bad_input_is_one_line_naming_it(all_cases, name):
    check(all_cases[name])


@pytest.mark.slow  # two `psr-ray run` processes that import the run's stack
def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_run(all_cases, work):
    """A run that failed to start (bad data) wrote no state.json: the corrected command into the same folder
    is not refused as "already holds a run" nor locked out; it goes on to its own (next) check."""
    case = all_cases["deeply nested JSONL line"]
    out = work / "out_nested"
    check(case)
    assert not (out / "state.json").exists()
    corrected = [a for a in case.argv if not a.startswith("data.source=")] + ["run.ray_address=127.0.0.1:1"]
    check(bi.BadInput("corrected", tuple(corrected), "psr-ray run: run.ray_address 127.0.0.1:1: nothing answers at "
                      "127.0.0.1:1 (Connection refused); is the Ray head running and reachable from here?"))  # fmt: skip


def test_generate_with_no_usable_problem_writes_no_pairs(all_cases, work):
    """It fails before the --output folder is made (no pairs, manifest or lock file): the corrected rerun into
    the same folder is not refused as "already holds step pairs"."""
    check(all_cases["generate with no usable problem"])
    assert not (work / "out_generate").exists()


# ---- machine states ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A small tmpfs at `path` (the real kernel behaviour of a full or read-only disk); skips where this
    process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def tiny_run(tiny_model_dir: str, out: Path) -> tuple[str, ...]:
    return ("run", f"model.path={tiny_model_dir}", "model.max_model_len=1024", "rollout.max_step_tokens=12",
            "judge.max_explanation_tokens=16", "eval.max_tokens=16", f"run.output_dir={out}")  # fmt: skip


def test_a_full_output_disk(tiny_model_dir, work):
    with tmpfs(work / "full") as disk:
        (disk / "filler").write_bytes(b"x" * 60_000)
        with contextlib.suppress(OSError):
            with (disk / "filler2").open("wb") as f:
                while True:
                    f.write(b"x" * 1024)
                    f.flush()
                    os.fsync(f.fileno())
        out = disk / "run"
        check(bi.BadInput("full disk", tiny_run(tiny_model_dir, out),
                          f"psr-ray run: output folder {out}: cannot write there (No space left on device)"))  # fmt: skip
        assert not (out / "state.json").exists()


def test_a_read_only_output_disk(tiny_model_dir, work):
    with tmpfs(work / "ro", "ro") as disk:
        out = disk / "run"
        check(bi.BadInput("read-only disk", tiny_run(tiny_model_dir, out),
                          f"psr-ray run: output folder {out}: cannot create it or its lock (Read-only file system)"))  # fmt: skip


def test_a_second_driver_on_a_folder_in_use(tiny_model_dir, work):
    from psr_ray.pipeline.run_dir import LOCK_FILE, RunDirLock

    out = work / "in_use"
    lock = RunDirLock(out)  # this process is "the first driver"
    try:
        holder = (out / LOCK_FILE).read_text()
        expected = (f"psr-ray run: {out} is in use by another psr-ray process ({holder}); two drivers on one folder "
                    "would race on its pairs and state.json: wait for it to end or stop it, or use another output "
                    "folder")  # fmt: skip
        assert json.loads(holder)["pid"] == os.getpid()
        check(bi.BadInput("second driver", tiny_run(tiny_model_dir, out), expected))
    finally:
        lock.release()
    # Released (as the kernel does when the holder dies, SIGKILL included): the folder is free again.
    RunDirLock(out).release()


def test_generate_and_train_refuse_a_used_output_folder(tiny_model_dir, work):
    from psr_ray.testing import make_pair

    used = work / "used_generate"
    (used / "pairs" / "iter_1").mkdir(parents=True)
    (used / "pairs" / "iter_1" / "manifest.json").write_text('{"parts": [], "done_problems": [], "num_pairs": 0}')
    tiny = tiny_run(tiny_model_dir, used)[1:]
    check(bi.BadInput("generate again", ("generate", *tiny, "--output", str(used)),
                      f"psr-ray generate: {used} already holds step pairs of an earlier pass ({used}/pairs/iter_1); "
                      "pass another --output, or --resume to finish that pass"))  # fmt: skip
    trained = work / "used_train"
    (trained / "v0002").mkdir(parents=True)
    pairs = work / "pairs_for_train"
    pairs.mkdir()
    import pyarrow.parquet as pq

    from psr_ray.data.schema import to_table

    pq.write_table(to_table([make_pair()]), pairs / "part-00000.parquet")
    check(bi.BadInput("train again", ("train", *tiny, "--pairs", str(pairs), "--output", str(trained)),
                      f"psr-ray train: {trained} is not empty (an earlier `psr-ray train`?); pass another --output, "
                      "or --resume to continue from its checkpoint"))  # fmt: skip


@pytest.mark.ray
def test_a_running_ray_start_head_is_left_alone_and_named(tiny_model_dir, tmp_path):
    """`ray start --head` on this machine (users do it to watch the dashboard): `psr-ray run` starts its own
    Ray sized for the run, says so and how to join that head instead; run.ray_address=auto joins it."""
    temp = Path(f"/tmp/psrh{os.getpid()}")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=1",
                             "--port=0", "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        address_file = temp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        address = address_file.read_text().strip()
        probe = (
            "import json, os, ray\nfrom psr_ray.runtime.cluster import init_ray, required_cpus\n"
            "from psr_ray.testing import tiny_cfg\n"
            f"cfg = tiny_cfg({tiny_model_dir!r}, {str(tmp_path)!r}, *{{}})\n"
            "print(json.dumps({'sized': max(os.cpu_count() or 1, required_cpus(cfg))}))\n"
            "init_ray(cfg)\n"
            "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, 'cpus': ray.cluster_resources()['CPU']}))\n"
        )  # fmt: skip
        separate = subprocess.run([sys.executable, "-c", probe.replace("{}", "()")], env=env, capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
        assert separate.returncode == 0, separate.stderr[-3000:]
        sized = json.loads(separate.stdout.strip().splitlines()[0])["sized"]
        assert (
            f"[psr_ray] a Ray cluster started with `ray start` runs here ({address}); this run starts its own "
            f"local Ray with {sized} CPUs. To run on that cluster instead, pass run.ray_address=auto"
        ) in separate.stdout
        started = json.loads(separate.stdout.strip().splitlines()[-1])
        assert started["gcs"] != address and started["cpus"] == sized  # its own cluster, sized for the run
        joined = subprocess.run([sys.executable, "-c", probe.replace("{}", "('run.ray_address=auto',)")], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert json.loads(joined.stdout.strip().splitlines()[-1]) == {"gcs": address, "cpus": 1.0}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
