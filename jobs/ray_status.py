"""Publish a running job's progress as its Ray job status message (`ray job status`, `ray job list`).

Ray has no public call for a running job to set its own message, so this rewrites the `message`
field of the job's record in the GCS, the same record Ray's job supervisor writes. It is safe
because the supervisor writes that record only before the driver starts and after the driver's
process tree has exited (`job_supervisor.py`, Ray 2.60), and it only ever touches a RUNNING job.
Best effort: a failure here never affects the batch job.
"""

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
    try:
        from ray._private import ray_constants
        from ray.dashboard.modules.job.common import JobInfo, JobInfoStorageClient, JobStatus
        from ray.experimental import internal_kv

        key = JobInfoStorageClient.JOB_DATA_KEY.format(job_id=job_id).encode()
        raw = internal_kv._internal_kv_get(key, namespace=ray_constants.KV_NAMESPACE_JOB)
        if raw is None:
            return False
        info = JobInfo.from_json(json.loads(raw))
        if info.status != JobStatus.RUNNING:
            return False
        info.message = message
        internal_kv._internal_kv_put(key, json.dumps(info.to_json()).encode(), overwrite=True,
                                     namespace=ray_constants.KV_NAMESPACE_JOB)
        return True
    except Exception as err:  # noqa: BLE001
        log.debug("could not publish progress to the Ray job record: %s", err)
        return False
