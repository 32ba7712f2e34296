"""``distill submit``: a pipeline run as a Ray Job on a cluster.

The pipeline file is validated here first (a bad config fails on the laptop, not after an
upload). The job's runtime environment carries the working directory (``.gitignore`` and
``.rayignore`` are honoured by Ray, so ``.venv`` and local stores stay behind), and its
entrypoint is ``distill run`` on the head with ``--address auto``: the same command a user
would type there. The decisions (entrypoint, where the config lies in the upload, the
exit code of a finished job) are pure functions, tested without a cluster.
"""

from __future__ import annotations

import os
import shlex
import time

from ..errors import UserError
from .tracking import redact_override

WHERE = "distill submit"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def config_in_working_dir(config: str, working_dir: str) -> str:
    """The config's path relative to the working directory that is uploaded."""
    cfg, wd = os.path.realpath(config), os.path.realpath(working_dir)
    rel = os.path.relpath(cfg, wd)
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        raise UserError(f"{WHERE}: the pipeline file {config!r} is outside --working-dir "
                        f"{working_dir!r}; allowed: a file inside the directory that is "
                        f"uploaded with the job")
    return rel


def cluster_store(store: str | None) -> str:
    """The ``--store`` of a job: one that every node of the cluster reaches at the same
    place (a relative path would land in the job's temporary working directory)."""
    if store and ("://" in store and not store.startswith("file://") or
                  os.path.isabs(store.removeprefix("file://"))):
        return store
    raise UserError(f"{WHERE}: --store {store!r} is not a store every node of the cluster "
                    f"reaches; allowed: an absolute path on a filesystem every node shares "
                    f"(e.g. /mnt/shared/distill), or s3://bucket/prefix")


def job_entrypoint(config_rel: str, store: str, overrides: list[str], force: list[str],
                   tracking_uri: str | None) -> str:
    """The shell command the job runs on the cluster."""
    cmd = ["distill", "run", config_rel, "--address", "auto", "--store", store]
    for o in overrides:
        cmd += ["--set", o]
    for f in force:
        cmd += ["--force", f]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    return shlex.join(cmd)


def retry_submit(message: str) -> bool:
    """A head that has just started answers before its job agent is up; that (and only
    that) is worth another try."""
    return "No available agent to submit job" in message


def exit_code(status: str) -> int:
    """0 for a job that succeeded, 1 for one that failed or was stopped."""
    return 0 if status == "SUCCEEDED" else 1


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError(f"{WHERE}: no --address (and RAY_ADDRESS is not set); allowed: the "
                        "Ray dashboard of the cluster's head, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, ValueError for a bad scheme, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{WHERE}: cannot reach the Ray Jobs server at --address "
                        f"{address!r} ({first}); allowed: the dashboard address of a running "
                        "head (`ray start --head` serves http://127.0.0.1:8265)") from None


def submit(config: str, address: str | None, store: str, overrides: list[str],
           force: list[str], tracking_uri: str | None, working_dir: str,
           follow: bool, out) -> int:
    from ..pipeline import Pipeline
    Pipeline.from_yaml(config, overrides)  # 1. fail here on a bad pipeline
    if not os.path.isdir(working_dir):
        raise UserError(f"{WHERE}: --working-dir {working_dir!r} is not a directory")
    rel = config_in_working_dir(config, working_dir)
    store = cluster_store(store)
    jobs = client(address)                  # 2. the cluster's Jobs server
    entry = job_entrypoint(rel, store, overrides, force, tracking_uri)
    job_id = submit_job(jobs, entry, os.path.abspath(working_dir))  # 3. upload + submit
    shown = job_entrypoint(rel, store, [redact_override(o) for o in overrides], force,
                           tracking_uri)
    print(f"submitted job {job_id}: {shown}", file=out, flush=True)
    if not follow:
        print(f"follow it with: ray job logs --address {jobs.get_address()} -f {job_id}",
              file=out)
        return 0
    status = stream_logs(jobs, job_id, out)  # 4. logs until the job ends
    print(f"job {job_id}: {status}", file=out, flush=True)
    return exit_code(status)


def submit_job(jobs, entry: str, working_dir: str, wait: float = 120.0) -> str:
    deadline = time.time() + wait
    while True:
        try:
            return jobs.submit_job(entrypoint=entry, runtime_env={"working_dir": working_dir})
        except RuntimeError as e:
            if retry_submit(str(e)) and time.time() < deadline:
                time.sleep(2.0)
                continue
            raise UserError(f"{WHERE}: the Jobs server at {jobs.get_address()} refused the "
                            f"job: {e}") from None


def stream_logs(jobs, job_id: str, out, poll: float = 1.0) -> str:
    """Print the job's log lines as they come (Ray's log tail, a websocket), then wait for
    its final status and return it."""
    import asyncio

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the stream broke; the job goes on
        print(f"{WHERE}: the log stream of job {job_id} stopped ({e}); waiting for the job "
              f"to end (its logs: ray job logs --address {jobs.get_address()} {job_id})",
              file=out, flush=True)
    while (status := str(jobs.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll)
    return status
