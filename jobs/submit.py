"""Ray Jobs: submit docqa to a cluster, and follow, inspect or stop what was submitted."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.config import ConfigError, JobConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGES = ("pipeline", "actors", "jobs")
FINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
LIVE_OR_DONE = {"PENDING", "RUNNING", "SUCCEEDED"}
AGENT_RETRIES = 30
# Ray runs an entrypoint with `/bin/sh -c`; dash forks the command, and a `docqa stop` that lands before that
# fork signals only the shell (Ray lists the processes to stop once), leaving the driver running. `exec`
# makes the driver the process Ray signals.
DRIVER = "exec python -m jobs.cli"


class SubmitError(RuntimeError):
    """The job could not be submitted, found or stopped; the message says why."""


def job_client(address: str | None):
    """Ray's JobSubmissionClient for the dashboard address (``--address``, else RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS as Ray's own `ray job` command reads them)."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise SubmitError(token_error(address, error)) from None
    except Exception as error:  # noqa: BLE001 - connection errors come in several types
        raise SubmitError(f"cannot reach the Ray job server at {address}: {error}") from None


def token_error(address: str, error: Exception) -> str:
    """What to do when the cluster (token authentication, Ray's default) turns docqa away."""
    problem = "rejected the token docqa sent" if "Authentication failed" in str(error) else "got no token from docqa"
    return (
        f"the Ray cluster at {address} {problem}. Give the client the cluster's token, either "
        "RAY_AUTH_MODE=token with the token in RAY_AUTH_TOKEN or in the file named by RAY_AUTH_TOKEN_PATH, "
        "or RAY_AUTH_MODE=token with the token in the default token file ~/.ray/auth_token "
        "(`ray get-auth-token` on the head prints it)"
    )


def _status(client, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError:  # Ray answers an unknown id with RuntimeError
        return None


def _known_status(client, submission_id: str) -> str:
    found = _status(client, submission_id)
    if found is None:
        raise SubmitError(f"no job {submission_id!r} on this cluster")
    return found


def stage_working_dir(config: JobConfig) -> Path:
    """A working_dir for the runtime env: this project's packages and the validated config, nothing else
    (no virtualenv, caches, outputs or tests travel)."""
    staging = Path(tempfile.mkdtemp(prefix="docqa-job-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in SHIPPED_PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, staging / package, ignore=ignore)
    (staging / "job.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return staging


def submit(config: JobConfig, address: str | None, nightly_date: str | None = None) -> str:
    """Submit a run (or the nightly run of ``nightly_date``) as a Ray Job and return its submission id.

    A nightly submission id is fixed by its date: if that job is pending, running or succeeded, nothing
    is submitted again and its id is returned; after a failed or stopped attempt the next attempt gets a
    suffix (the run itself resumes, its run id being fixed by the date too)."""
    from jobs.run import new_run_id

    if config.render.passwords:
        raise ConfigError(
            "render.passwords would travel with the job (its files and metadata are readable on the cluster): "
            "put the passwords in an environment variable every Ray node has (from a KubeRay secret, or in the "
            "environment of `ray start`), one per line, and name it with render.passwords_env"
        )
    client = job_client(address)
    if nightly_date:
        base = f"docqa-nightly-{nightly_date}"
        entrypoint = f"{DRIVER} nightly --config job.yaml --date {nightly_date}"
        for attempt in range(1, 100):
            submission_id = base if attempt == 1 else f"{base}-attempt-{attempt}"
            status = _status(client, submission_id)
            if status in LIVE_OR_DONE:
                return submission_id
            if status is None:
                break
    else:
        from datetime import UTC, datetime

        run_id = config.run_id or new_run_id(datetime.now(UTC))
        config = config.model_copy(update={"run_id": run_id})
        submission_id = f"docqa-run-{run_id}"
        entrypoint = f"{DRIVER} run --config job.yaml"
    staging = stage_working_dir(config)
    try:
        for attempt in itertools.count(1):
            try:
                return client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"working_dir": str(staging), "env_vars": {"PYTHONUNBUFFERED": "1"}},
                    metadata={"docqa": "nightly" if nightly_date else "run", "output": config.output},
                )
            except RuntimeError as error:
                # A head that has just started answers "No available agent ... try again later" for a while.
                if "try again later" not in str(error) or attempt >= AGENT_RETRIES:
                    raise SubmitError(f"submitting {submission_id}: {error}") from None
                time.sleep(2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def wait(address: str | None, submission_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    client = job_client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := _known_status(client, submission_id)) not in FINAL_STATUSES:
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
    return status


def driver_exit_code(address: str | None, submission_id: str) -> int | None:
    """The exit code of a finished job's driver (`docqa run`/`nightly`: 3 for a degraded run), if Ray has it."""
    return job_client(address).get_job_info(submission_id).driver_exit_code


def status(address: str | None, submission_id: str) -> str:
    return _known_status(job_client(address), submission_id)


def logs(address: str | None, submission_id: str, follow: bool = False) -> None:
    client = job_client(address)
    _known_status(client, submission_id)
    if not follow:
        print(client.get_job_logs(submission_id), end="")
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def stop(address: str | None, submission_id: str) -> bool:
    client = job_client(address)
    _known_status(client, submission_id)
    return client.stop_job(submission_id)
