"""`psr-ray submit`: run the driver as a Ray job on a cluster through Ray's JobSubmissionClient.

The address is `--address` or `$RAY_ADDRESS` (the dashboard's, http://HEAD:8265). The Ray auth token is
`$RAY_AUTH_TOKEN`, else the file `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (Ray's own order), sent as
a Bearer header; a cluster that asks for one and gets none is a one-line error, a token about to cross plain
http to another host is warned about first. Secrets the job needs (WANDB_API_KEY, HF_TOKEN) travel from this
shell's environment in the job's runtime_env, never from a file in the repo.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from psr_ray.config import REPO_ROOT
from psr_ray.config.errors import UserError

RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
# Environment variables copied from the submitting shell into the job when set (secrets stay out of the repo).
FORWARDED_SECRETS = ("WANDB_API_KEY", "HF_TOKEN")
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token); on KubeRay: "
    "export RAY_AUTH_TOKEN=$(kubectl get secret <cluster name> -o jsonpath='{.data.auth_token}' | base64 -d)"
)


def job_entrypoint(config_paths: list[str], overrides: list[str]) -> str:
    """The job's command line; config paths are made relative to the uploaded working_dir (the repo)."""
    parts = ["python", "-m", "psr_ray"]
    for path in config_paths:
        resolved = Path(path).resolve()
        try:
            path = str(resolved.relative_to(REPO_ROOT))
        except ValueError:
            raise UserError(
                f"--config {path} must live inside {REPO_ROOT} to travel with the job's working_dir"
            ) from None
        parts += ["--config", path]
    return shlex.join(parts + list(overrides))


def runtime_env(path: Path = RUNTIME_ENV, *, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """jobs/runtime_env.yaml with its working_dir made absolute (it is relative to the repo) and the secrets
    of FORWARDED_SECRETS that are set in `environ` added to its env_vars."""
    import yaml

    env = yaml.safe_load(path.read_text()) or {}
    if "working_dir" in env:
        env["working_dir"] = str((REPO_ROOT / env["working_dir"]).resolve())
    secrets = {name: environ[name] for name in FORWARDED_SECRETS if environ.get(name)}
    if secrets:
        env["env_vars"] = {**env.get("env_vars", {}), **secrets}
    return env


def resolve_address(address: str | None, *, environ: Mapping[str, str] = os.environ) -> str:
    """The dashboard URL to submit to: `address`, else $RAY_ADDRESS; `host:port` gets http://."""
    address = address or environ.get("RAY_ADDRESS") or ""
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://") or address == "auto":
        raise UserError(
            f"address {address!r} is not the dashboard's; submit to http://HEAD:8265 "
            "(`ray dashboard cluster/aws.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265`)"
        )
    return address if "://" in address else f"http://{address}"


def find_token(*, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order; (None, "") when there is none."""
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip(), f"RAY_AUTH_TOKEN_PATH={path}"
        except OSError as err:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror}); fix it or unset it") from None
    default = Path(environ.get("HOME") or "~").expanduser() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None, str(default)
    return None, ""


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def auth_headers(address: str, token: str | None, *, warn: Callable[[str], None]) -> dict[str, str]:
    """The Authorization header for `token`; warns first when it would cross plain http to another host."""
    if token is None:
        return {}
    url = urlparse(address)
    if url.scheme == "http" and not is_loopback(url.hostname):
        warn(
            f"[psr_ray] warning: sending the Ray auth token over plain http to {url.hostname}; anyone on the path "
            "can read it and run code on the cluster. Use https, or a tunnel to 127.0.0.1 (`ray dashboard "
            "cluster/aws.yaml`, `kubectl port-forward`)"
        )
    return {"Authorization": f"Bearer {token}"}


def _check_resolves(address: str) -> None:
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(address).hostname
    if not host:
        raise UserError(f"address {address!r} names no host; submit to http://HEAD:8265")
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        raise UserError(f"cannot reach a Ray dashboard at {address}: no host named {host!r} resolves") from None


def dashboard_nodes(address: str, headers: dict[str, str], *, wait_s: float = 15.0) -> list[dict[str, float]]:
    """The total resources of every live node of the cluster behind the dashboard at `address`. A head that
    just started lists no node for a moment (a cluster always has its head), so an empty list is asked again."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, NodeState, StateResource

    deadline = time.monotonic() + wait_s
    while True:
        nodes = StateApiClient(address, headers=headers).list(
            StateResource.NODES, ListApiOptions(limit=10_000), raise_on_missing_output=False
        )
        alive = [dict(n.resources_total) for n in nodes if isinstance(n, NodeState) and n.state == "ALIVE"]
        if alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def connect(address: str | None, *, environ: Mapping[str, str] = os.environ) -> tuple[Any, str, dict[str, str]]:
    """A JobSubmissionClient for the cluster, its address and headers (its token); auth failures become
    one-line UserErrors."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address, environ=environ)
    _check_resolves(address)  # before any token is sent (or warned about) to a host that does not exist
    token, source = find_token(environ=environ)
    headers = auth_headers(address, token, warn=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # the first call that needs the token, if the cluster asks for one
    except Exception as err:
        text = str(err)
        if token is None and ("Unauthorized" in text or "no authentication token" in text.lower()):
            raise UserError(
                f"the cluster at {address} requires a Ray auth token and none was found: {TOKEN_HELP}"
            ) from None
        if token is not None and ("Forbidden" in text or "Invalid authentication token" in text):
            raise UserError(
                f"the cluster at {address} rejected the Ray auth token from {source}; {TOKEN_HELP}"
            ) from None
        if isinstance(err, ConnectionError) or "Failed to connect" in text:
            raise UserError(
                f"cannot reach a Ray dashboard at {address}: {text.splitlines()[0] if text else err}"
            ) from None
        raise
    if token is None:
        print(
            f"[psr_ray] warning: {address} accepted a job without an auth token: whoever reaches it can run code "
            "there. Turn on RAY_AUTH_MODE=token (the cluster/ files do).",
            file=sys.stderr,
            flush=True,
        )
    return client, address, headers


def submit(
    address: str | None,
    config_paths: list[str],
    overrides: list[str],
    *,
    wait: bool = True,
    env: dict[str, Any] | None = None,
    agent_wait_s: float = 120.0,
    check_cluster: Callable[[str, list[dict[str, float]]], None] | None = None,
) -> int:
    """Submits the job; with `wait`, streams its logs and returns 0 / 1 / 2 for SUCCEEDED / FAILED / STOPPED.
    `check_cluster(address, nodes)` sees the cluster's live nodes first (it shows them, and raises when the run
    cannot be placed there: before a job lands on the wrong cluster)."""
    import logging

    # Ray's packaging lines (each file it skips uploading, and that .git/.venv are skipped by default, which
    # jobs/runtime_env.yaml asks for anyway) are not for people.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    client, address, headers = connect(address)
    if check_cluster is not None:
        check_cluster(address, dashboard_nodes(address, headers))
    entrypoint = job_entrypoint(config_paths, overrides)
    env = runtime_env() if env is None else env
    forwarded = sorted(set(env.get("env_vars", {})) & set(FORWARDED_SECRETS))
    if forwarded:
        print(f"[psr_ray] passing {', '.join(forwarded)} from this shell to the job (runtime_env env_vars)")
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, metadata={"psr_ray": "1"})
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
