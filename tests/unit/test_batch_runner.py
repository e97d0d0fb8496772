"""jobs.batch against a fake OpenAI server on loopback (the process boundary is faked, not the runner)."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.batch import parse_args, run


class FakeOpenAI:
    """Answers chat completions; fails the first `num_unavailable` calls with 503, and any request
    whose content says 'reject' with a 400."""

    def __init__(self, num_unavailable=0):
        self.num_unavailable = num_unavailable
        self.bodies = []
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake._lock:
                    fake._active += 1
                    fake.max_concurrent = max(fake.max_concurrent, fake._active)
                    unavailable = fake.num_unavailable > 0
                    fake.num_unavailable -= 1
                    fake.bodies.append(body)
                try:
                    import time
                    time.sleep(0.02)
                    if unavailable:
                        return self._reply(503, {"error": {"message": "replica restarting"}})
                    if "reject" in json.dumps(body["messages"]):
                        return self._reply(400, {"error": {"message": "rejected", "type": "BadRequestError", "code": 400}})
                    n = body.get("max_tokens", 1)
                    self._reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                   "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
                finally:
                    with fake._lock:
                        fake._active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def write_input(path, n, reject=()):
    with open(path, "w") as f:
        for i in range(n):
            content = "reject me" if i in reject else f"question {i}"
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 5}}) + "\n")
        f.write("{broken\n")


def run_job(tmp_path, fake, *extra):
    args = parse_args(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                       "--endpoint", fake.url, "--no-ray", "--progress-interval-s", "0", *extra])
    return asyncio.run(run(args))


def test_every_request_is_offline_and_gets_exactly_one_record(tmp_path, fake):
    write_input(tmp_path / "in.jsonl", 12, reject={3})
    summary = run_job(tmp_path, fake, "--concurrency", "3")
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(f"q{i}" for i in range(12))
    assert all(b["request_class"] == "offline" and b["model"] == "fake-model" for b in fake.bodies)
    assert fake.max_concurrent <= 3
    rejected = next(r for r in records if r["custom_id"] == "q3")
    assert rejected["response"]["status_code"] == 400
    assert summary["done"] == 12 and summary["num_failed"] == 1 and summary["num_input_errors"] == 1
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [13]


def test_unavailable_replica_is_retried_not_recorded(tmp_path):
    fake = FakeOpenAI(num_unavailable=4)
    try:
        write_input(tmp_path / "in.jsonl", 3)
        summary = run_job(tmp_path, fake, "--concurrency", "1")
    finally:
        fake.close()
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response"]["status_code"] for r in records] == [200, 200, 200]
    assert summary["num_retries"] == 4


def test_resume_skips_finished_work(tmp_path, fake):
    write_input(tmp_path / "in.jsonl", 6)
    run_job(tmp_path, fake)
    first = (tmp_path / "out.jsonl").read_text()
    write_input(tmp_path / "in.jsonl", 9)  # the same job, grown: only the new requests run
    before = len(fake.bodies)
    run_job(tmp_path, fake)
    assert len(fake.bodies) - before == 3
    final = (tmp_path / "out.jsonl").read_text()
    assert final.startswith(first)
    assert len(final.splitlines()) == 9


def test_parquet_output(tmp_path, fake):
    import pyarrow.parquet as pq

    write_input(tmp_path / "in.jsonl", 4)
    args = parse_args(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.parquet"),
                       "--endpoint", fake.url, "--no-ray", "--model", "fake-model"])
    asyncio.run(run(args))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["custom_id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert all(r["status_code"] == 200 and r["completion_tokens"] == 5 for r in rows)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--input", str(tmp_path / "missing.jsonl"), "--output", "o.jsonl"])
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--input", str(tmp_path / "in.jsonl"), "--output", "o.jsonl", "--weight", "0"])


def test_max_in_flight_bounds_the_static_cap(tmp_path, fake):
    write_input(tmp_path / "in.jsonl", 8)
    run_job(tmp_path, fake, "--concurrency", "4", "--max-in-flight", "1")
    assert fake.max_concurrent == 1


def test_a_streaming_line_goes_to_the_errors_file_and_the_rest_completes(tmp_path, fake):
    write_input(tmp_path / "in.jsonl", 3)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write(json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True}}) + "\n")
    summary = run_job(tmp_path, fake)
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["q0", "q1", "q2"]
    assert not any(b.get("stream") for b in fake.bodies)
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["custom_id"]) for e in errors] == [(4, None), (5, "s")]
    assert "cannot stream" in errors[1]["reason"]
    assert summary["done"] == 3 and summary["num_input_errors"] == 2
