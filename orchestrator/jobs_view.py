"""Join Ray's job list with the progress batch jobs report to the admission actor."""

from __future__ import annotations

from typing import Any


def _progress_by_output() -> dict[str, dict[str, Any]]:
    import ray

    from orchestrator.admission import get_or_create_admission

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
