"""Batch jobs through Ray Jobs: submitting one, following it, and the job list joined with the
progress batch jobs report to the admission actor."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Uploaded to the cluster as the job's working directory: the code, not environments or data.
JOB_EXCLUDES = [".venv", ".colocate", ".git", "results", "**/__pycache__", "*.parquet"]


def batch_entrypoint(args: list[str]) -> str:
    """The batch job's command line. Ray Jobs runs an entrypoint through a shell, so every argument
    is quoted: a path with a space, a quote or `$(...)` in it is passed as it is and runs nothing."""
    return shlex.join(["python", "-m", "jobs.batch", *args])


def submit_batch_job(dashboard_url: str, entrypoint_args: list[str], metadata: dict[str, str]) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    return client.submit_job(
        entrypoint=batch_entrypoint(entrypoint_args),
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": JOB_EXCLUDES},
        metadata=metadata,
        entrypoint_num_cpus=0,
    )


def wait_for_job(dashboard_url: str, job_id: str, timeout_s: float,
                 on_progress: Callable[[str], None]) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        progress = [ln for ln in logs.splitlines() if "progress:" in ln]
        if progress and progress[-1] != last:
            last = progress[-1]
            on_progress("batch " + last.split("progress:", 1)[1].strip())
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value), logs
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return "TIMED_OUT", logs
        time.sleep(2)




def _progress_by_output() -> dict[str, dict[str, Any]]:
    import ray

    from orchestrator.control.admission import get_or_create_admission

    try:
        return {p.get("output"): p for p in ray.get(get_or_create_admission().jobs.remote(), timeout=10).values()}
    except Exception:  # noqa: BLE001 - progress is best effort; the job list still shows
        return {}


def job_rows(jobs: list[Any]) -> list[dict[str, Any]]:
    """One row per batch job (entrypoint `python -m jobs.batch`), newest first."""
    progress = _progress_by_output()
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        if "jobs.batch" not in (job.entrypoint or ""):
            continue
        try:
            args = shlex.split(job.entrypoint)
        except ValueError:  # not a shell word list (unbalanced quotes): best effort, as it was submitted
            args = job.entrypoint.split()
        output = args[args.index("--output") + 1] if "--output" in args else None
        p = progress.get(output, {})
        rows.append({
            "job_id": job.submission_id or job.job_id,
            "status": str(job.status.value if hasattr(job.status, "value") else job.status),
            "output": output,
            "done": p.get("done"), "total": p.get("total"),
            "tokens_per_s": p.get("tokens_per_s"), "eta_s": p.get("eta_s"),
            "num_failed": p.get("num_failed"), "num_input_errors": p.get("num_input_errors"),
            "weight": p.get("weight"), "allowed_inflight": p.get("allowed_inflight"),
            "message": job.message,
        })
    return rows
