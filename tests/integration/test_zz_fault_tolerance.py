"""Killing a replica, the admission actor or the controller mid-job loses no batch result and
duplicates none; the controller comes back with its checkpointed state.

Named to run last: killing the replica makes Serve start a new one (a new engine), and this test
waits until the application is healthy again before it ends.
"""

from __future__ import annotations

import time

import pytest
import ray
from ray.job_submission import JobStatus

from orchestrator.cluster.lifecycle import LLM_DEPLOYMENT_PREFIX, connect
from orchestrator.control.admission import ADMISSION_NAME
from orchestrator.control.admission import NAMESPACE as ADMISSION_NAMESPACE
from orchestrator.control.controller import get_controller
from tests.integration.test_batch_jobs import records, start_job_and_wait_for_results, write_input

pytestmark = pytest.mark.integration


def test_killing_the_replica_admission_and_controller_mid_job_loses_and_duplicates_nothing(stack, tmp_path):
    from ray import serve

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 60, max_tokens=48)
    client, job_id = start_job_and_wait_for_results(stack, inp, out, "kill", max_in_flight=2, min_results=5)

    connect(stack["gcs_address"])
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and f"#{LLM_DEPLOYMENT_PREFIX}" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace="serve"), no_restart=True)
    ray.kill(ray.get_actor(ADMISSION_NAME, namespace=ADMISSION_NAMESPACE), no_restart=True)
    # The controller is killed as a crash would: Ray restarts it and it restores its checkpoint.
    ray.kill(get_controller(), no_restart=False)

    deadline = time.monotonic() + 600
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    # Requests in flight on the killed replica are either re-routed by Serve or fail and are
    # retried by the job ("retrying" in its log); either way none is lost or written twice.
    final = records(out)
    assert sorted(r["custom_id"] for r in final) == ids  # exactly one result per input
    assert all(r["response"]["status_code"] == 200 for r in final)

    # the application recovered on its own: a new replica serves chat
    app_status = serve.status().applications[stack["app_name"]]
    assert app_status.status == "RUNNING"
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and f"#{LLM_DEPLOYMENT_PREFIX}" in a["name"]]
    assert replicas and replica["name"] not in replicas

    # The restarted controller restored its state and decides for the new replica.
    deadline = time.monotonic() + 60
    while True:
        status = ray.get(get_controller().status.remote(), timeout=30)
        if status["replicas"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status["restored_from_checkpoint"]
    assert status["replicas"], status
