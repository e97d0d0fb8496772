"""Publish a running job's progress as its Ray job status message (`ray job status`, `ray job list`),
through `orchestrator.compat.ray_api.publish_job_message` (a private Ray record; see there)."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("colocate.batch")


def submission_id() -> str | None:
    """The submission id of the Ray job this process is the driver of, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except json.JSONDecodeError:
        return None


def publish_progress(job_id: str, message: str) -> bool:
    """Best effort: a failure here never affects the batch job."""
    try:
        from orchestrator.compat.ray_api import publish_job_message

        return publish_job_message(job_id, message)
    except Exception as err:  # noqa: BLE001
        log.debug("could not publish progress to the Ray job record: %s", err)
        return False
