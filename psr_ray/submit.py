"""`psr-ray submit`: run the driver as a Ray job on a cluster through Ray's JobSubmissionClient."""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path
from typing import Any

from psr_ray.config import REPO_ROOT

RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}


def job_entrypoint(config_paths: list[str], overrides: list[str]) -> str:
    """The job's command line; config paths are made relative to the uploaded working_dir (the repo)."""
    parts = ["python", "-m", "psr_ray"]
    for path in config_paths:
        resolved = Path(path).resolve()
        try:
            path = str(resolved.relative_to(REPO_ROOT))
        except ValueError:
            raise ValueError(f"--config {path} must live inside {REPO_ROOT} to travel with the job's working_dir") from None
        parts += ["--config", path]
    return shlex.join(parts + list(overrides))


def runtime_env(path: Path = RUNTIME_ENV) -> dict[str, Any]:
    """jobs/runtime_env.yaml with its working_dir made absolute (it is relative to the repo)."""
    import yaml

    env = yaml.safe_load(path.read_text()) or {}
    if "working_dir" in env:
        env["working_dir"] = str((REPO_ROOT / env["working_dir"]).resolve())
    return env


def submit(address: str, config_paths: list[str], overrides: list[str], *, wait: bool = True,
           env: dict[str, Any] | None = None, agent_wait_s: float = 120.0) -> int:
    """Submits the job; with `wait`, streams its logs and returns 0 / 1 / 2 for SUCCEEDED / FAILED / STOPPED."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=job_entrypoint(config_paths, overrides),
                runtime_env=runtime_env() if env is None else env,
                metadata={"psr_ray": "1"},
            )
            break
        except RuntimeError as err:
            # A head that just started answers before its job agent has registered: wait for it.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"[psr_ray] submitted job {job_id} to {address}")
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:  # logs can end a moment before the status settles
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"[psr_ray] job {job_id}: {status}")
    return TERMINAL[status]
