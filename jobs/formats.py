"""Batch input and output formats: OpenAI Batch API JSONL and Parquet.

Parsing never stops at a bad line: each problem becomes an `InputError` with its line number
(1-based; the row number for Parquet) and the reason, and the rest of the input is still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")
SAMPLING_COLUMNS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "min_tokens")


@dataclass(frozen=True)
class BatchItem:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class InputError:
    line: int
    custom_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "reason": self.reason}


def _validate_body(url: str, body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if body.get("stream") not in (None, False):
        # A streamed answer is a series of events, not one response body to record.
        return "body.stream must be false or absent: batch requests cannot stream"
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "body.messages must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return f"body.messages[{i}] must be an object with role and content"
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            return "body.prompt must be a non-empty string or list"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        return "body.max_tokens must be a positive integer"
    return None


def _check_record(line: int, record: Any, seen: set[str]) -> BatchItem | InputError:
    if not isinstance(record, dict):
        return InputError(line, None, "line is not a JSON object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return InputError(line, None, "missing custom_id")
    if custom_id in seen:
        return InputError(line, custom_id, f"duplicate custom_id {custom_id!r}")
    method = record.get("method", "POST")
    if method != "POST":
        return InputError(line, custom_id, f"method must be POST, got {method!r}")
    url = record.get("url")
    if url not in SUPPORTED_URLS:
        return InputError(line, custom_id, f"unknown url {url!r}; supported: {', '.join(SUPPORTED_URLS)}")
    reason = _validate_body(url, record.get("body"))
    if reason:
        return InputError(line, custom_id, f"invalid body: {reason}")
    seen.add(custom_id)
    return BatchItem(line, custom_id, url, dict(record["body"]))


def read_jsonl(path: Path) -> tuple[list[BatchItem], list[InputError]]:
    items: list[BatchItem] = []
    errors: list[InputError] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                errors.append(InputError(line_no, None, f"bad JSON: {err.msg} at column {err.colno}"))
                continue
            result = _check_record(line_no, record, seen)
            (items if isinstance(result, BatchItem) else errors).append(result)
    return items, errors


def read_parquet(path: Path) -> tuple[list[BatchItem], list[InputError]]:
    """Rows with a `messages` (list of {role, content}) or `prompt` column, an optional
    `custom_id` (default: the row number), and optional sampling columns."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = set(table.column_names)
    if not columns & {"messages", "prompt"}:
        return [], [InputError(0, None, f"{path}: needs a 'messages' or 'prompt' column, has {sorted(columns)}")]
    items: list[BatchItem] = []
    errors: list[InputError] = []
    seen: set[str] = set()
    for row_no, row in enumerate(table.to_pylist(), start=1):
        custom_id = row.get("custom_id")
        custom_id = str(custom_id) if custom_id is not None else f"row-{row_no}"
        if row.get("messages") is not None:
            url, body = "/v1/chat/completions", {"messages": row["messages"]}
        else:
            url, body = "/v1/completions", {"prompt": row.get("prompt")}
        for col in SAMPLING_COLUMNS:
            if row.get(col) is not None:
                body[col] = row[col]
        if row.get("model") is not None:
            body["model"] = row["model"]
        record = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
        result = _check_record(row_no, record, seen)
        (items if isinstance(result, BatchItem) else errors).append(result)
    return items, errors


def read_input(path: str | Path) -> tuple[list[BatchItem], list[InputError]]:
    p = Path(path)
    if p.suffix == ".parquet":
        return read_parquet(p)
    return read_jsonl(p)


def request_fingerprint(item: BatchItem) -> str:
    """What a result answers: the request's url and body (key order aside). Resuming is safe only
    while each finished result's `custom_id` still names the same request."""
    canonical = json.dumps({"url": item.url, "body": item.body}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def output_record(item: BatchItem, status_code: int, body: dict[str, Any] | None,
                  error: dict[str, Any] | None, request_id: str | None) -> dict[str, Any]:
    """One line of OpenAI Batch output: `response` for any HTTP answer, `error` if none came."""
    rid = hashlib.sha1(item.custom_id.encode()).hexdigest()[:24]
    return {
        "id": f"batch_req_{rid}",
        "custom_id": item.custom_id,
        "response": None if body is None else {"status_code": status_code, "request_id": request_id, "body": body},
        "error": error,
    }


def parquet_tmp_path(path: Path) -> Path:
    """Where the Parquet output is written before it is renamed into place."""
    return path.with_suffix(path.suffix + ".tmp")


def write_parquet_output(records: list[dict[str, Any]], path: Path) -> None:
    """Flat, typed columns for analysis; the full response body stays available as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for r in records:
        body = (r.get("response") or {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        rows.append({
            "custom_id": r["custom_id"],
            "status_code": (r.get("response") or {}).get("status_code"),
            "text": text,
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "error": json.dumps(r["error"]) if r.get("error") else None,
            "response_json": json.dumps(r.get("response")),
        })
    schema = pa.schema([
        ("custom_id", pa.string()), ("status_code", pa.int32()), ("text", pa.string()),
        ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("error", pa.string()), ("response_json", pa.string()),
    ])
    tmp = parquet_tmp_path(path)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(path)
