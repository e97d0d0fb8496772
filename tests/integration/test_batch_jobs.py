"""Batch jobs submitted with the real `ray job submit` CLI to the local cluster, on vLLM-on-CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")


def write_input(path: Path, n: int, max_tokens: int, malformed: bool = False) -> list[str]:
    ids = []
    with open(path, "w") as f:
        for i in range(n):
            cid = f"item-{i:03d}"
            ids.append(cid)
            f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": {
                "model": "colocate-tiny", "messages": [{"role": "user", "content": f"summarize item {i} " * 20}],
                "max_tokens": max_tokens, "ignore_eos": True}}) + "\n")
            if malformed and i == 2:
                f.write("{this is not json\n")
                f.write(json.dumps({"custom_id": "item-000", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"messages": [{"role": "user", "content": "dup"}]}}) + "\n")
                f.write(json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
                                    "body": {"input": "x"}}) + "\n")
    return ids


def submit(stack, inp: Path, out: Path, *extra: str, wait: bool = True,
           submission_id: str | None = None) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", stack["dashboard_url"], "--working-dir", str(ROOT)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", "-m", "jobs.batch", "--input", str(inp), "--output", str(out),
            "--endpoint", stack["endpoint"], "--progress-interval-s", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=stack["env"], capture_output=True, text=True, timeout=600)


def start_job_and_wait_for_results(stack, inp: Path, out: Path, name: str, max_in_flight: int,
                                   min_results: int) -> tuple[JobSubmissionClient, str]:
    """Submit with `ray job submit --no-wait`; return once `min_results` results are written."""
    job_id = f"colocate-test-{name}-{int(time.time())}"
    # An explicit bound: under a controller a job follows its budget, not --concurrency.
    result = submit(stack, inp, out, "--max-in-flight", str(max_in_flight), wait=False, submission_id=job_id)
    assert result.returncode == 0, result.stderr[-3000:]
    client = JobSubmissionClient(stack["dashboard_url"])
    deadline = time.monotonic() + 300
    while not (out.exists() and len(out.read_text().splitlines()) >= min_results):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    return client, job_id


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_job_with_malformed_lines_completes_the_rest(stack, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 6, max_tokens=4, malformed=True)
    result = submit(stack, inp, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    assert "progress: 6/6" in result.stdout
    got = records(out)
    assert sorted(r["custom_id"] for r in got) == ids
    assert all(r["response"]["status_code"] == 200 for r in got)
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 4 for r in got)
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["custom_id"]) for e in errors] == [(4, None), (5, "item-000"), (6, "emb")]
    assert "duplicate" in errors[1]["reason"] and "unknown url" in errors[2]["reason"]


def test_stopped_job_leaves_consistent_output_and_resubmit_completes_without_redoing(stack, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 120, max_tokens=64)
    client, job_id = start_job_and_wait_for_results(stack, inp, out, "stop", max_in_flight=1, min_results=6)
    subprocess.run([RAY, "job", "stop", "--address", stack["dashboard_url"], job_id],
                   env=stack["env"], check=True, capture_output=True, timeout=120)
    while client.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        time.sleep(0.5)
    partial_text = out.read_text()
    partial = [json.loads(x) for x in partial_text.splitlines()]  # every line is complete JSON
    assert 6 <= len(partial) < 120
    assert len({r["custom_id"] for r in partial}) == len(partial)

    result = submit(stack, inp, out, "--concurrency", "16")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{len(partial)} already done" in result.stdout
    final_text = out.read_text()
    assert final_text.startswith(partial_text)  # finished work kept as it was, not redone
    final = records(out)
    assert sorted(r["custom_id"] for r in final) == ids
    assert all(r["response"]["status_code"] == 200 for r in final)


def test_colocate_submit_and_jobs_show_progress_to_completion(stack, tmp_path):
    import pyarrow.parquet as pq

    from tests.integration.conftest import colocate_cmd

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    ids = write_input(inp, 8, max_tokens=8)
    sub = subprocess.run(colocate_cmd("submit", str(inp), "--output", str(out), "--weight", "2"),
                         cwd=ROOT, env=stack["env"], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 300
    while True:
        listing = subprocess.run(colocate_cmd("jobs", "--json"), cwd=ROOT, env=stack["env"],
                                 capture_output=True, text=True, timeout=120, check=True)
        row = next(r for r in json.loads(listing.stdout) if r["job_id"] == job_id)
        if row["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and row["done"] == row["total"]:
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    assert row["status"] == "SUCCEEDED" and (row["done"], row["total"]) == (8, 8)
    assert row["tokens_per_s"] > 0
    table = pq.read_table(out).to_pylist()
    assert sorted(r["custom_id"] for r in table) == ids
    assert all(r["completion_tokens"] == 8 for r in table)


def test_two_jobs_share_offline_capacity_by_weight_and_publish_progress_to_ray(stack, tmp_path):
    from tests.integration.conftest import colocate_cmd

    client = JobSubmissionClient(stack["dashboard_url"])
    stamp = int(time.time())
    jobs = {}
    # The controller sets the total offline concurrency; pin it to 4 so the split is known.
    subprocess.run(colocate_cmd("override", "--max-offline-seqs", "4"), cwd=ROOT, env=stack["env"],
                   capture_output=True, text=True, timeout=120, check=True)
    # Submitted through the job SDK, back to back, so that the two jobs surely overlap (the CLI
    # takes seconds per call on a busy machine; the other tests cover the CLI itself).
    for name, weight in (("light", "1"), ("heavy", "3")):
        inp, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl"
        write_input(inp, 120, max_tokens=32)
        job_id = f"colocate-test-{name}-{stamp}"
        client.submit_job(
            submission_id=job_id, runtime_env={"working_dir": str(ROOT)},
            entrypoint=(f"python -m jobs.batch --input {inp} --output {out} --endpoint {stack['endpoint']} "
                        f"--weight {weight} --concurrency 4 --progress-interval-s 1"),
        )
        jobs[job_id] = (weight, out)

    seen_message = False
    listed = set()
    deadline = time.monotonic() + 600
    while not all(client.get_job_status(j) in (JobStatus.SUCCEEDED, JobStatus.FAILED) for j in jobs):
        assert time.monotonic() < deadline
        for j in jobs:
            info = client.get_job_info(j)
            seen_message |= info.status == JobStatus.RUNNING and "progress:" in (info.message or "")
        if len(listed) < len(jobs):
            listing = subprocess.run(colocate_cmd("jobs", "--json"), cwd=ROOT, env=stack["env"],
                                     capture_output=True, text=True, timeout=120, check=True)
            listed |= {r["job_id"] for r in json.loads(listing.stdout) if r["job_id"] in jobs and r["total"] == 120}
        time.sleep(0.5)
    assert seen_message, "no progress in the Ray job status message"
    assert listed == set(jobs)  # `colocate jobs` showed both with their progress

    def allowances(job_id):
        return {int(m) for m in re.findall(r"in flight <= (\d+)", client.get_job_logs(job_id))}

    light, heavy = (f"colocate-test-{n}-{stamp}" for n in ("light", "heavy"))
    subprocess.run(colocate_cmd("override", "--clear"), cwd=ROOT, env=stack["env"],
                   capture_output=True, text=True, timeout=120, check=True)
    # While both ran, the total of 4 was split 1:3.
    assert 1 in allowances(light) and 3 in allowances(heavy), (allowances(light), allowances(heavy))
    for j, (_, out) in jobs.items():
        assert client.get_job_status(j) == JobStatus.SUCCEEDED
        assert len({r["custom_id"] for r in records(out)}) == 120
