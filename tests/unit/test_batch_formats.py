import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.checkpoint import ResultLog
from jobs.formats import output_record, read_input, write_parquet_output

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def line(custom_id, url="/v1/chat/completions", body=None, **extra):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": CHAT if body is None else body, **extra})


def test_malformed_lines_become_errors_with_line_numbers_and_the_rest_is_read(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        line("a"),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": CHAT}),
        line("a"),
        line("b", url="/v1/embeddings"),
        line("c", body={"model": "m"}),
        line("d", body={**CHAT, "max_tokens": -3}),
        line("e", method="GET"),
        "",
        line("f", url="/v1/completions", body={"prompt": "once upon", "max_tokens": 2}),
    ]) + "\n")
    items, errors = read_input(path)
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (10, "f")]
    got = {e.line: (e.custom_id, e.reason) for e in errors}
    assert got[2][1].startswith("bad JSON")
    assert got[3] == (None, "missing custom_id")
    assert got[4] == ("a", "duplicate custom_id 'a'")
    assert "unknown url '/v1/embeddings'" in got[5][1]
    assert got[6] == ("c", "invalid body: body.messages must be a non-empty list")
    assert got[7] == ("d", "invalid body: body.max_tokens must be a positive integer")
    assert "method must be POST" in got[8][1]
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8]


def test_parquet_input_with_messages_or_prompt(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "custom_id": ["x", "y", "x"],
        "messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}],
                     [{"role": "user", "content": "again"}]],
        "max_tokens": [3, None, 5],
    }), path)
    items, errors = read_input(path)
    assert [(i.custom_id, i.body.get("max_tokens")) for i in items] == [("x", 3), ("y", None)]
    assert [(e.line, e.reason) for e in errors] == [(3, "duplicate custom_id 'x'")]
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c d"]}), prompts)
    items, errors = read_input(prompts)
    assert [(i.custom_id, i.url) for i in items] == [("row-1", "/v1/completions"), ("row-2", "/v1/completions")]
    neither = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a"]}), neither)
    items, errors = read_input(neither)
    assert not items and "needs a 'messages' or 'prompt' column" in errors[0].reason


def _record(cid):
    items, _ = read_input_from_lines([line(cid)])
    return output_record(items[0], 200, {"usage": {"completion_tokens": 1}}, None, "r")


def read_input_from_lines(lines):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    p = d / "x.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return read_input(p)


def test_result_log_resumes_cuts_a_torn_tail_and_never_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    log = ResultLog(out).open()
    log.append(_record("a"))
    log.append(_record("b"))
    log.append(_record("a"))  # a second answer for a done id is dropped
    log.close()
    with open(out, "ab") as f:
        f.write(b'{"custom_id": "c", "resp')  # killed mid-write
    log = ResultLog(out).open()
    assert sorted(log.done) == ["a", "b"]
    log.append(_record("c"))
    log.close()
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert ids == ["a", "b", "c"]


def test_result_log_allows_one_writer(tmp_path):
    first = ResultLog(tmp_path / "out.jsonl").open()
    with pytest.raises(RuntimeError, match="another running job"):
        ResultLog(tmp_path / "out.jsonl").open()
    first.close()
    ResultLog(tmp_path / "out.jsonl").open().close()


def test_parquet_output_has_one_typed_row_per_record(tmp_path):
    items, _ = read_input_from_lines([line("a"), line("b")])
    recs = [
        output_record(items[0], 200, {"choices": [{"message": {"content": "hey"}, "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, None, "r1"),
        output_record(items[1], 400, {"error": {"message": "bad"}}, None, None),
    ]
    write_parquet_output(recs, tmp_path / "o.parquet")
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [(r["custom_id"], r["status_code"], r["text"], r["completion_tokens"]) for r in rows] == [
        ("a", 200, "hey", 4), ("b", 400, None, None)]


def test_a_streaming_body_is_an_input_error_and_the_rest_is_read(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        line("a", body={**CHAT, "stream": True}),
        line("b", body={**CHAT, "stream": False}),
        line("c", url="/v1/completions", body={"prompt": "p", "stream": True}),
        line("d"),
    ]) + "\n")
    items, errors = read_input(path)
    assert [i.custom_id for i in items] == ["b", "d"]
    assert [(e.line, e.custom_id) for e in errors] == [(1, "a"), (3, "c")]
    assert all("batch requests cannot stream" in e.reason for e in errors)
