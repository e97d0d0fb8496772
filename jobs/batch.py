"""Run an offline batch job on the co-located replicas.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.batch --input IN --output OUT [--model M] [--weight W]

Every request is sent as `request_class: offline`, to the same OpenAI endpoint that serves chat,
and only as many at once as the offline admission actor allows this job (its weighted share of
the offline budget; `--max-in-flight` bounds it). Results are checkpointed line by line;
resubmitting the same command resumes where the last run stopped, without redoing or duplicating
finished work. The job refuses (exit code 2, writing nothing) an output it would have to destroy
or mix up: the input itself, a file it did not write, or the results of another input.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import ray_status
from jobs.checkpoint import (
    OutputRefused,
    ResultLog,
    lock_path,
    meta_path,
    mismatched_results,
    read_meta,
    write_meta,
)
from jobs.formats import (
    BatchItem,
    output_record,
    parquet_tmp_path,
    read_input,
    request_fingerprint,
    write_parquet_output,
)
from orchestrator.logs import quiet_http_client_logs
from orchestrator.names import ENV_ENDPOINT, NAMESPACE

log = logging.getLogger("colocate.batch")

DEFAULT_ENDPOINT = os.environ.get(ENV_ENDPOINT, "http://127.0.0.1:8000/v1")
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class Progress:
    total: int
    done: int = 0
    num_failed: int = 0
    num_input_errors: int = 0
    num_retries: int = 0
    completion_tokens: int = 0
    started_s: float = field(default_factory=time.monotonic)
    done_at_start: int = 0

    def snapshot(self) -> dict[str, Any]:
        elapsed_s = max(time.monotonic() - self.started_s, 1e-6)
        rate = (self.done - self.done_at_start) / elapsed_s
        remaining = self.total - self.done
        return {
            "done": self.done,
            "total": self.total,
            "num_failed": self.num_failed,
            "num_input_errors": self.num_input_errors,
            "num_retries": self.num_retries,
            "tokens_per_s": self.completion_tokens / elapsed_s,
            "eta_s": remaining / rate if rate > 0 else None,
            "elapsed_s": elapsed_s,
        }

    def line(self, allowed_inflight: int | None = None) -> str:
        s = self.snapshot()
        eta = f"{s['eta_s']:.0f}s" if s["eta_s"] is not None else "?"
        pct = 100.0 * s["done"] / max(s["total"], 1)
        return (f"progress: {s['done']}/{s['total']} ({pct:.1f}%), {s['tokens_per_s']:.1f} tok/s, "
                f"ETA {eta}, failed {s['num_failed']}, retries {s['num_retries']}"
                + (f", in flight <= {allowed_inflight}" if allowed_inflight is not None else ""))


class Admission:
    """This job's in-flight allowance, from the cluster's admission actor when there is one.

    `default_cap` (`--concurrency`) is the allowance while no controller sets a total budget or
    the actor is unreachable; `max_cap` (`--max-in-flight`, None: none) bounds it always, here as
    well as in the actor, so the bound holds even against an actor started by older code."""

    def __init__(self, key: str, weight: float, default_cap: int, use_ray: bool,
                 max_cap: int | None = None) -> None:
        self.key, self.weight, self.default_cap, self.max_cap = key, weight, default_cap, max_cap
        self.allowed = self._bounded(default_cap)
        self._actor = None
        self._use_ray = use_ray

    def _bounded(self, allowed: int) -> int:
        return allowed if self.max_cap is None else min(allowed, self.max_cap)

    def _heartbeat_blocking(self, progress: dict[str, Any]) -> int:
        import ray

        from orchestrator.control.admission import get_or_create_admission

        if self._actor is None:
            self._actor = get_or_create_admission()
        return ray.get(self._actor.heartbeat.remote(self.key, self.weight, self.default_cap, progress,
                                                    self.max_cap), timeout=5)

    async def heartbeat(self, progress: dict[str, Any]) -> None:
        if not self._use_ray:
            return
        try:
            allowed = await asyncio.to_thread(self._heartbeat_blocking, {**progress, "allowed_inflight": self.allowed})
            self.allowed = self._bounded(allowed)
        except Exception as err:  # noqa: BLE001 - admission gone (restarting): keep the static cap
            self._actor = None
            self.allowed = self._bounded(self.default_cap)
            log.warning("admission unavailable (%s); using the static cap %d", type(err).__name__, self.allowed)


def _connect_ray() -> bool:
    """Join the Ray cluster the job runs in (RAY_ADDRESS is set by `ray job submit`).

    Never auto-detects: other users' clusters may run on the same machine."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        log.warning("RAY_ADDRESS is not set (not running as a Ray job); running with the static cap")
        return False
    try:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        return True
    except Exception as err:  # noqa: BLE001
        log.warning("not connected to a Ray cluster (%s); running with the static cap", err)
        return False


async def _send(client, item: BatchItem, model: str | None, progress: Progress,
                max_attempts: int) -> dict[str, Any]:
    import openai

    body = dict(item.body)
    if model:
        body["model"] = model
    body["request_class"] = "offline"
    path = item.url.removeprefix("/v1")
    delay_s = 0.5
    for attempt in range(1, max_attempts + 1):
        try:
            raw = await client.post(path, body=body, cast_to=object, options={"headers": {}})
            return output_record(item, 200, raw, None, (raw or {}).get("id"))
        except openai.APIStatusError as err:
            if err.status_code in (401, 403) and isinstance(err.body, dict) \
                    and err.body.get("code") in ("invalid_api_key", "permission_denied"):
                raise AccessRefused(f"{item.custom_id}: {err.message}") from None
            if err.status_code not in RETRYABLE_STATUS or attempt == max_attempts:
                err_body = err.body if isinstance(err.body, dict) else {"message": str(err.message)}
                return output_record(item, err.status_code, {"error": err_body}, None, None)
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            if attempt == max_attempts:
                return output_record(item, 0, None, {"code": "connection_error", "message": str(err)}, None)
        progress.num_retries += 1
        log.info("retrying %s (attempt %d): replica unavailable", item.custom_id, attempt)
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 10.0)
    raise AssertionError("unreachable")


class AccessRefused(RuntimeError):
    """The endpoint refused the job's API key (401/403): every request would fail alike, so
    the job stops with what it has written, and a resubmit with the right key carries on."""


async def _resolve_model(client, model: str | None) -> str | None:
    """The model to send (the one served, when not given); listing also checks the API key."""
    import openai

    try:
        models = await client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
        raise AccessRefused(f"the endpoint refused this job's API key ({err.status_code}): set it in "
                            "the variable --api-key-env names") from None
    if model:
        return model
    ids = [m.id for m in models.data]
    return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True)
class OutputFiles:
    """Every file a job writes: results (the output itself for JSONL, a `.partial.jsonl` beside
    a Parquet output), malformed input lines, and the results record."""

    output: Path
    results: Path
    errors: Path
    meta: Path

    @classmethod
    def of(cls, output: Path, errors: Path | None) -> OutputFiles:
        results = output if output.suffix != ".parquet" else output.with_name(output.name + ".partial.jsonl")
        return cls(output, results, errors or output.with_name(output.name + ".errors.jsonl"), meta_path(output))

    def written(self) -> dict[str, Path]:
        """By the name a refusal gives each; the scratch files too, as they are written as well."""
        named = {"--output": self.output, "errors file": self.errors, "lock file": lock_path(self.results),
                 "results record": self.meta,
                 "results record's temporary file": self.meta.with_name(self.meta.name + ".tmp")}
        if self.output != self.results:
            named |= {"results file": self.results, "Parquet temporary file": parquet_tmp_path(self.output)}
        return named


def _same_file(a: Path, b: Path) -> bool:
    """Also through symlinks and hard links, for files that exist."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _has_data(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def check_distinct_files(input_path: Path, files: OutputFiles) -> None:
    """Refuse an output layout in which one write would overwrite the input or another output file
    (`--output` = `--input`, or `--errors` = `--output`): the results log and the errors file are
    opened for writing, which would destroy what they share a file with."""
    written = list(files.written().items())
    for name, path in written:
        if _same_file(input_path, path):
            raise OutputRefused(f"{name} {path} is the input file {input_path}; choose another --output"
                                + (" or --errors" if name == "errors file" else ""))
    for k, (name, path) in enumerate(written):
        for other_name, other in written[k + 1:]:
            if _same_file(path, other):
                raise OutputRefused(f"{name} {path} and {other_name} {other} are the same file; "
                                    "choose another --output or --errors")


def check_own_output(files: OutputFiles, meta: dict[str, Any] | None, done_ids: set[str],
                     requests: dict[str, str], input_path: Path) -> None:
    """Refuse to write into anything but this input's own output.

    Without a results record, any data at the output paths is someone else's. With one, every
    finished result (and every row of a final Parquet file, which holds a whole earlier input)
    must answer the request this input has under that custom_id: then this is the same job,
    resumed, or grown by new requests; otherwise its results would be mixed with another input's.
    """
    has_final = files.output != files.results and _has_data(files.output)
    if meta is None:
        present = [p for p in (files.results, files.output, files.errors) if _has_data(p)]
        if present:
            raise OutputRefused(f"{present[0]} exists and was not written by a batch job (there is no "
                                f"{files.meta}); choose another --output or delete it")
        return
    if _has_data(files.errors) and meta.get("errors") != str(files.errors.resolve()):
        raise OutputRefused(f"{files.errors} exists and is not this output's errors file; "
                            "choose another --errors or delete it")
    answered = done_ids | (set(meta["requests"]) if has_final else set())
    bad = mismatched_results(answered, meta["requests"], requests)
    if bad:
        raise OutputRefused(f"{files.output} holds results of another input ({meta.get('input')}): {len(bad)} "
                            f"of them are not requests of {input_path} (e.g. custom_id {bad[0]!r}); choose "
                            f"another --output or delete {files.output} and {files.meta}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job; OutputRefused, before anything is written, if that could destroy data."""
    from openai import AsyncOpenAI

    input_path = Path(args.input)
    files = OutputFiles.of(Path(args.output), Path(args.errors) if args.errors else None)
    output, errors_path = files.output, files.errors
    check_distinct_files(input_path, files)
    items, input_errors = read_input(input_path)
    requests = {i.custom_id: request_fingerprint(i) for i in items}
    results = ResultLog(files.results).load()
    check_own_output(files, read_meta(files.meta), set(results.done), requests, input_path)

    # Checked: from here on, every file written is this job's own.
    results.open()
    write_meta(files.meta, {"input": str(input_path.resolve()), "input_sha256": _file_sha256(input_path),
                            "errors": str(errors_path.resolve()), "requests": requests})
    errors_path.parent.mkdir(parents=True, exist_ok=True)
    with open(errors_path, "w") as f:
        for e in input_errors:
            f.write(json.dumps(e.to_json()) + "\n")
    if input_errors:
        log.warning("%d malformed input line(s) written to %s", len(input_errors), errors_path)

    wanted = {i.custom_id for i in items}
    progress = Progress(total=len(items), num_input_errors=len(input_errors))
    progress.done = progress.done_at_start = sum(1 for c in results.done if c in wanted)
    todo = [i for i in items if i.custom_id not in results.done]
    log.info("%d requests, %d already done, %d to run", len(items), progress.done, len(todo))

    key = hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:12]
    use_ray = not args.no_ray and _connect_ray()
    admission = Admission(key, args.weight, args.concurrency, use_ray=use_ray, max_cap=args.max_in_flight)
    job_id = ray_status.submission_id() if use_ray else None
    api_key = os.environ.get(args.api_key_env) or "unused"  # "unused": an endpoint without keys
    client = AsyncOpenAI(base_url=args.endpoint, api_key=api_key, max_retries=0, timeout=args.request_timeout_s)
    model = await _resolve_model(client, args.model)

    inflight: set[asyncio.Task] = set()
    queue = list(reversed(todo))
    last_report = 0.0
    await admission.heartbeat({**progress.snapshot(), "input": str(args.input), "output": str(output)})
    while queue or inflight:
        while queue and len(inflight) < max(admission.allowed, 1):
            item = queue.pop()
            inflight.add(asyncio.create_task(_send(client, item, model, progress, args.max_attempts)))
        done, inflight = await asyncio.wait(inflight, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            record = task.result()
            results.append(record)
            progress.done += 1
            body = (record.get("response") or {}).get("body") or {}
            progress.completion_tokens += (body.get("usage") or {}).get("completion_tokens", 0) or 0
            if record["error"] or (record["response"] or {}).get("status_code") != 200:
                progress.num_failed += 1
        now = time.monotonic()
        if now - last_report >= args.progress_interval_s:
            last_report = now
            log.info(progress.line(admission.allowed))
            await admission.heartbeat({**progress.snapshot(), "input": str(args.input), "output": str(output)})
            if job_id:
                await asyncio.to_thread(ray_status.publish_progress, job_id, progress.line(admission.allowed))

    final = progress.snapshot()
    await admission.heartbeat({**final, "finished": True, "input": str(args.input), "output": str(output)})
    if output.suffix == ".parquet":
        write_parquet_output([results.done[i.custom_id] for i in items], output)
    results.close()
    log.info(progress.line())
    summary = {**final, "output": str(output), "errors_file": str(errors_path)}
    print("batch summary: " + json.dumps(summary), flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="OpenAI Batch JSONL or Parquet file")
    p.add_argument("--output", required=True, help="output .jsonl (OpenAI Batch output) or .parquet")
    p.add_argument("--errors", help="malformed input lines (default: OUTPUT.errors.jsonl)")
    p.add_argument("--model", help="model for every request (default: each body's, else the served one)")
    p.add_argument("--weight", type=float, default=1.0, help="share of offline capacity relative to other jobs")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="OpenAI base URL of the chat service")
    p.add_argument("--api-key-env", default="COLOCATE_API_KEY",
                   help="environment variable holding the endpoint's API key (serve.auth), if it has keys; "
                        "ship it with `ray job submit --runtime-env-json '{\"env_vars\": {...}}'`")
    p.add_argument("--concurrency", type=int, default=4,
                   help="offline requests in flight when no controller sets the budget (with one, the "
                        "job gets its weighted share of the controller's total instead)")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="never more offline requests in flight than this, whatever the budget (default: no bound)")
    p.add_argument("--max-attempts", type=int, default=20, help="tries per request on 5xx or connection errors")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--progress-interval-s", type=float, default=5.0)
    p.add_argument("--no-ray", action="store_true", help="do not join a Ray cluster (static cap only)")
    args = p.parse_args(argv)
    if args.weight <= 0:
        p.error("--weight must be positive")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        p.error("--max-in-flight must be at least 1")
    if not Path(args.input).is_file():
        p.error(f"--input {args.input}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    quiet_http_client_logs()
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except (OutputRefused, AccessRefused) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
