from __future__ import annotations

import subprocess
import sys
import time

HEAVY = ("ray", "vllm", "deepspeed", "torch", "pyarrow", "transformers")


def test_import_is_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter(); import psr_ray, psr_ray.config, psr_ray.core.steps, "
        "psr_ray.core.prompts, psr_ray.app.cli, psr_ray.runtime.metrics, psr_ray.engines.api, psr_ray.pipeline.loop, "
        "psr_ray.weight_sync, psr_ray.engines.pool; "
        f"print(time.perf_counter() - t); print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert float(out[0]) < 1.0, out
    assert out[1] == "", f"import psr_ray pulled in heavy modules: {out[1]}"
    assert time.perf_counter() - start < 10


def test_cli_validate_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "psr_ray.app.cli", "validate"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout:\n  num_candidates: 1\ntrainer:\n  beta: fast\n")
    bad = subprocess.run(
        [sys.executable, "-m", "psr_ray.app.cli", "validate", "--config", str(broken)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "trainer.beta" in bad.stderr


def test_cli_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "psr_ray.app.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("validate", "print-config", "run", "generate", "train", "eval", "init", "submit"):
        assert command in out
    assert "examples:" in out


def test_print_config_is_resolved_yaml():
    out = subprocess.run(
        [sys.executable, "-m", "psr_ray.app.cli", "print-config", "rollout.num_candidates=3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "num_candidates: 3" in out and "judge:" in out
