"""Faults under load: chat at a steady rate and a batch job across the replicas, while a replica,
the controller and the job's driver are killed and the KV cache is filled, one after another.

For each fault it reports what happened to the chat requests in flight at that moment (completed,
a clean OpenAI-style error, any other error, or hung past the client's timeout), how long until a
chat request sent after the fault was served, how long until chat met the SLO again (the first
run of `slo_run` consecutive requests, by start, that each met both targets), and at the end the
batch job's count: exactly one result per input, after the driver was killed and resubmitted.

`colocate faults` brings up its own stack (manifests/colocate-faults.yaml: two replicas of the
tiny model with a small KV cache, so that filling it takes a dozen requests);
tests/integration/test_zz_two_replicas.py runs the same code against its own two-replica stack
and asserts the invariants.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAULTS = ("driver", "replica", "controller", "kv")
"""The default order: the driver first, so that it is killed while its job runs on any host."""


@dataclass
class FaultsOptions:
    rate_per_s: float = 0.8
    """Chat requests per second (Poisson): the bench's rate."""
    warmup_s: float = 30.0
    phase_s: float = 45.0
    """Seconds between faults; each fault is watched this long."""
    faults: tuple[str, ...] = FAULTS
    num_batch: int = 1000
    """Requests per batch job. A job that finishes before the next fault is followed by another
    (its own input and output), so every fault meets a running job on a host of any speed; each
    fault's report says whether one was running."""
    batch_prompt_tokens: int = 64
    batch_output_tokens: int = 32
    chat_prompt_tokens: int = 48
    chat_output_tokens: int = 128
    """Replies long enough (about a second here) that a fault finds chat requests in flight."""
    request_timeout_s: float = 60.0
    """A chat request without its last token after this long counts as hung."""
    kv_fill_requests: int = 12
    kv_prompt_tokens: int = 1500
    kv_output_tokens: int = 200
    slo_run: int = 10
    job_timeout_s: float = 900.0
    driver_ready_timeout_s: float = 120.0
    """How long the driver fault waits for the job's driver to register and write a result."""
    seed: int = 0


@dataclass
class ChatRecord:
    start_s: float
    end_s: float | None = None
    first_token_s: float | None = None
    num_tokens: int = 0
    outcome: str = "pending"
    """ok, clean_error (an OpenAI-style error reply), error (anything else), hung."""
    error: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.start_s) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.num_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1000.0 / (self.num_tokens - 1)

    def met(self, slo: dict[str, float]) -> bool:
        if self.outcome != "ok" or self.ttft_ms is None or self.ttft_ms > slo["ttft_p99_ms"]:
            return False
        return self.tpot_ms is None or self.tpot_ms <= slo["tpot_p99_ms"]


# --- what a fault did (pure) ----------------------------------------------------------------------

def fault_report(records: list[ChatRecord], fault_s: float, until_s: float, slo: dict[str, float],
                 slo_run: int = 10) -> dict[str, Any]:
    """What the fault at `fault_s` did to chat, judged on the requests up to `until_s`."""
    in_flight = [r for r in records if r.start_s <= fault_s and (r.end_s is None or r.end_s > fault_s)]
    after = sorted((r for r in records if fault_s <= r.start_s < until_s), key=lambda r: r.start_s)
    served = [r.first_token_s - fault_s for r in after if r.outcome == "ok" and r.first_token_s is not None]
    slo_again = None
    for i in range(len(after) - slo_run + 1):
        if all(r.met(slo) for r in after[i:i + slo_run]):
            slo_again = after[i].start_s - fault_s
            break
    outcomes = {k: sum(r.outcome == k for r in in_flight) for k in ("ok", "clean_error", "error", "hung")}
    return {"in_flight": len(in_flight), **{f"in_flight_{k}": v for k, v in outcomes.items()},
            "errors": sorted({r.error for r in in_flight if r.error})[:5],
            "new_chat_served_after_s": min(served) if served else None,
            "slo_holds_again_after_s": slo_again,
            "num_after": len(after), "attainment_after": (sum(r.met(slo) for r in after) / len(after)) if after else None}


def engine_report(samples: list[dict[str, Any]], fault_s: float, until_s: float) -> dict[str, Any]:
    """The engines between this fault and the next: peak KV use, offline preemptions, and the
    most requests (both classes) one replica held: Serve's router queues a request only when
    every replica holds `max_ongoing_requests`, so a peak below it means chat never waited
    there behind offline work (sampled once a second)."""
    window = [s for s in samples if fault_s <= s["t_s"] < until_s]
    kv = [s["kv_cache_usage"] for s in window if s.get("kv_cache_usage") is not None]
    preempted = 0
    for replica in {s["replica"] for s in window}:
        counts = [s["num_offline_preempted_total"] for s in window
                  if s["replica"] == replica and s.get("num_offline_preempted_total") is not None]
        if counts:
            preempted += max(counts) - min(counts)
    ongoing = [s["num_ongoing"] for s in window if s.get("num_ongoing") is not None]
    return {"kv_cache_usage_max": max(kv) if kv else None, "num_offline_preempted": preempted,
            "num_ongoing_max": max(ongoing) if ongoing else None}


def job_count(output: Path, ids: list[str]) -> dict[str, Any]:
    """The batch job's output against its input: exactly one result per input is the bar."""
    seen: list[str] = []
    statuses: dict[str, int] = {}
    if output.exists():
        for line in output.read_text().splitlines():
            rec = json.loads(line)
            seen.append(rec["custom_id"])
            code = (rec.get("response") or {}).get("status_code", 0)
            statuses[str(code)] = statuses.get(str(code), 0) + 1
    unique = set(seen)
    return {"num_inputs": len(ids), "num_results": len(seen), "num_unique": len(unique),
            "num_duplicates": len(seen) - len(unique), "num_missing": len(set(ids) - unique),
            "status_codes": statuses, "exactly_once": len(seen) == len(unique) == len(ids) and unique == set(ids)}


# --- chat load --------------------------------------------------------------------------------------

class ChatLoad:
    """Poisson chat arrivals in a thread of their own, every request streamed and recorded."""

    def __init__(self, endpoint: str, model: str, opts: FaultsOptions, api_key: str = "unused") -> None:
        self.endpoint, self.model, self.opts, self.api_key = endpoint, model, opts, api_key
        self.records: list[ChatRecord] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; wait for what is in flight (at most the request timeout)."""
        self._stop.set()
        self._thread.join(self.opts.request_timeout_s + 30)

    async def _run(self) -> None:
        from openai import AsyncOpenAI

        from profiler.workload import make_prompt

        rng = random.Random(self.opts.seed)
        tasks = []
        async with AsyncOpenAI(base_url=self.endpoint, api_key=self.api_key, max_retries=0,
                               timeout=self.opts.request_timeout_s) as client:
            i = 0
            while not self._stop.is_set():
                await asyncio.sleep(rng.expovariate(self.opts.rate_per_s))
                if self._stop.is_set():
                    break
                prompt = make_prompt(self.opts.chat_prompt_tokens, f"faults-chat-{self.opts.seed}-{i}")
                tasks.append(asyncio.create_task(self._one(client, prompt)))
                i += 1
            await asyncio.gather(*tasks)

    async def _one(self, client, prompt: str) -> None:
        import openai

        rec = ChatRecord(self.now_s())
        self.records.append(rec)

        async def stream() -> None:
            chunks = await client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=self.opts.chat_output_tokens, stream=True, temperature=0.0,
                extra_body={"ignore_eos": True})
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason is None:
                    rec.first_token_s = rec.first_token_s or self.now_s()
                    rec.num_tokens += 1

        try:
            await asyncio.wait_for(stream(), timeout=self.opts.request_timeout_s)
            rec.outcome = "ok"
        except (asyncio.TimeoutError, openai.APITimeoutError):
            rec.outcome, rec.error = "hung", f"no reply within {self.opts.request_timeout_s:.0f} s"
        except openai.APIStatusError as err:
            body = err.body if isinstance(err.body, dict) else None
            rec.outcome = "clean_error" if body and "message" in body else "error"
            rec.error = f"{err.status_code}: {str(err.message)[:120]}"
        except Exception as err:  # noqa: BLE001 - a broken stream is a result to report
            rec.outcome, rec.error = "error", f"{type(err).__name__}: {str(err)[:120]}"
        rec.end_s = self.now_s()


# --- the run ------------------------------------------------------------------------------------------

@dataclass
class Stack:
    endpoint: str
    model: str
    gcs_address: str
    dashboard_url: str
    app_name: str = "colocate"
    env: dict[str, str] = field(default_factory=dict)
    max_ongoing_requests: int | None = None
    """Serve's per-replica cap on requests in flight, for the report (None: not known)."""


class FaultRun:
    def __init__(self, stack: Stack, opts: FaultsOptions, out_dir: Path, slo: dict[str, float],
                 on_progress: Callable[[str], None] = print) -> None:
        self.stack, self.opts, self.out_dir, self.slo, self.say = stack, opts, out_dir, slo, on_progress
        self.job_ids: list[str] = []
        self.kv_threads: list[threading.Thread] = []

    def run(self) -> dict[str, Any]:
        from ray.job_submission import JobSubmissionClient

        from orchestrator.cluster.lifecycle import connect
        from profiler.workload import RequestSpec, write_batch_input

        o = self.opts
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results_path = self.out_dir / "results.json"
        if results_path.exists():
            raise FileExistsError(f"{results_path} exists; choose another --out")
        connect(self.stack.gcs_address)
        self.client = JobSubmissionClient(self.stack.dashboard_url)
        self._specs = [RequestSpec(0.0, o.batch_prompt_tokens, o.batch_output_tokens)] * o.num_batch
        self.parts: list[tuple[Path, Path, list[str]]] = []
        self._write_input = write_batch_input
        chat = ChatLoad(self.stack.endpoint, self.stack.model, o)
        self.samples: list[dict[str, Any]] = []
        sampling = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(chat, sampling), daemon=True)
        chat.start()
        sampler.start()
        self._new_part()
        self.say(f"[faults] chat at {o.rate_per_s}/s and a {o.num_batch}-request batch job; warming up {o.warmup_s:.0f} s")
        time.sleep(o.warmup_s)
        injected: list[dict[str, Any]] = []
        for kind in o.faults:
            if self.client.get_job_status(self.job_ids[-1]).value in ("SUCCEEDED", "FAILED", "STOPPED"):
                # The job finished (a fast host): a fresh one, so every fault meets a running job.
                # Waited for until it runs: a fixed 3-s pause met a job still PENDING (its driver
                # starting) in a full test run, and the controller fault found no job running.
                self._new_part()
                self._wait_running(o.job_timeout_s)
            if (ready := getattr(self, f"_ready_{kind}", None)) is not None:
                ready()
            at_s = chat.now_s()
            running = self.client.get_job_status(self.job_ids[-1]).value == "RUNNING"
            detail = getattr(self, f"_inject_{kind}")()
            injected.append({"fault": kind, "at_s": at_s, "detail": detail, "job_running": running})
            self.say(f"[faults] {at_s:6.1f} s: {kind} ({detail}); watching {o.phase_s:.0f} s")
            time.sleep(o.phase_s)
            if (after := getattr(self, f"_after_{kind}", None)) is not None:
                after()
        chat.stop()
        sampling.set()
        sampler.join(10)
        self.say("[faults] chat stopped; waiting for the batch job")
        status = self._wait_job(o.job_timeout_s)
        for job_id in self.job_ids[:-1]:  # earlier parts: finished, or killed (the driver fault)
            self.say(f"[faults] {job_id}: {self.client.get_job_status(job_id).value}")
        for t in self.kv_threads:
            t.join(o.request_timeout_s * 4)
        end_s = chat.now_s()
        reports = []
        for i, f in enumerate(injected):
            until = injected[i + 1]["at_s"] if i + 1 < len(injected) else end_s
            reports.append({**f, **fault_report(chat.records, f["at_s"], until, self.slo, o.slo_run),
                            **engine_report(self.samples, f["at_s"], until)})
        records = chat.records
        result = {
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(o).items()},
            "slo": self.slo, "faults": reports, "max_ongoing_requests": self.stack.max_ongoing_requests, "job": {**self._job_totals(), "status": status,
                                                        "submissions": self.job_ids},
            "chat": {"num": len(records), **{k: sum(r.outcome == k for r in records)
                                            for k in ("ok", "clean_error", "error", "hung")},
                     "attainment": sum(r.met(self.slo) for r in records) / len(records) if records else None},
            "records": [{**asdict(r), "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms} for r in records],
            "samples": self.samples,
        }
        results_path.write_text(json.dumps(result, indent=1))
        result["plot"] = str(plot(result, self.out_dir / "faults.png"))
        return result

    def _sample(self, chat: ChatLoad, stop: threading.Event) -> None:
        """Each replica's KV use and offline preemptions, every second (the registry's reports)."""
        import ray

        from orchestrator.serving.registry import get_or_create_registry

        while not stop.wait(1.0):
            try:
                reports = ray.get(get_or_create_registry().snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a missed sample is a gap, not a failure
                continue
            t = chat.now_s()
            for r in reports:
                inflight = r.get("num_inflight") or {}
                self.samples.append({"t_s": t, "replica": r["replica_id"], "kv_cache_usage": r.get("kv_cache_usage"),
                                     "num_ongoing": sum(int(v) for v in inflight.values()),
                                     "num_offline_preempted_total": (r.get("engine") or {}).get("num_offline_preempted_total")})

    # --- faults -------------------------------------------------------------------------------

    def _new_part(self) -> None:
        """A batch job of its own input and output (`num_batch` requests), submitted."""
        i = len(self.parts)
        inp = self._write_input(self._specs, self.out_dir / f"batch-input-{i}.jsonl", self.stack.model, f"faults{i}")
        ids = [json.loads(line)["custom_id"] for line in inp.read_text().splitlines()]
        self.parts.append((inp, self.out_dir / f"batch-output-{i}.jsonl", ids))
        self.batch_in, self.batch_out = inp, self.parts[-1][1]
        self._submit()

    def _job_totals(self) -> dict[str, Any]:
        """`job_count` over every part: exactly once means every part exactly once."""
        counts = [job_count(out, ids) for _, out, ids in self.parts]
        total = {k: sum(c[k] for c in counts) for k in
                 ("num_inputs", "num_results", "num_unique", "num_duplicates", "num_missing")}
        codes: dict[str, int] = {}
        for c in counts:
            for code, n in c["status_codes"].items():
                codes[code] = codes.get(code, 0) + n
        return {**total, "status_codes": codes, "exactly_once": all(c["exactly_once"] for c in counts),
                "num_jobs": len(self.parts)}

    def _submit(self) -> None:
        from orchestrator.cluster.jobs import submit_batch_job

        args = ["--input", str(self.batch_in.resolve()), "--output", str(self.batch_out.resolve()),
                "--endpoint", self.stack.endpoint, "--progress-interval-s", "2"]
        self.job_ids.append(submit_batch_job(self.stack.dashboard_url, args, {"colocate": "faults"}))

    def _wait_running(self, timeout_s: float) -> str:
        """Until the latest job leaves PENDING (running, or already done); its status."""
        deadline = time.monotonic() + timeout_s
        status = self.client.get_job_status(self.job_ids[-1]).value
        while status == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.5)
            status = self.client.get_job_status(self.job_ids[-1]).value
        return status

    def _wait_job(self, timeout_s: float) -> str:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.client.get_job_status(self.job_ids[-1])
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status.value
            time.sleep(1.0)
        return "TIMED_OUT"

    def _inject_replica(self) -> str:
        """Kill the replica with the most chat in flight (then the most offline work): the case
        that tests what happens to requests in flight."""
        import ray

        from orchestrator.names import LLM_DEPLOYMENT_PREFIX
        from orchestrator.serving.registry import get_or_create_registry

        load = {r["replica_id"]: (r["num_inflight"]["online"], r["num_inflight"]["offline"])
                for r in ray.get(get_or_create_registry().snapshot.remote(), timeout=30)}
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and f"{self.stack.app_name}#{LLM_DEPLOYMENT_PREFIX}" in a["name"]]
        name = max(names, key=lambda n: load.get(n.rsplit("#", 1)[-1], (0, 0)))
        online, offline = load.get(name.rsplit("#", 1)[-1], (0, 0))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        return f"killed {name.rsplit('#', 1)[-1]} ({online} chat, {offline} offline in flight); Serve starts another"

    def _inject_controller(self) -> str:
        import ray

        from orchestrator.control.controller import get_controller

        ray.kill(get_controller(), no_restart=False)
        return "killed; Ray restarts it from its checkpoint"

    def _ready_driver(self) -> None:
        """A job is RUNNING from the moment its entrypoint starts, but its driver registers with
        Ray (and so has a pid to kill) only once it has imported and joined the cluster, which
        takes seconds on a loaded host: wait for that and for its first results, so that the
        kill meets a driver with work both done and still to do."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + self.opts.driver_ready_timeout_s
        while time.monotonic() < deadline:
            info = self.client.get_job_info(self.job_ids[-1])
            written = self.batch_out.exists() and self.batch_out.stat().st_size > 0
            if info.status != JobStatus.RUNNING or (info.driver_info is not None and written):
                return
            time.sleep(0.5)

    def _inject_driver(self) -> str:
        from ray.job_submission import JobStatus

        job_id = self.job_ids[-1]
        info = self.client.get_job_info(job_id)
        if info.status != JobStatus.RUNNING or info.driver_info is None:
            return f"job {job_id} not running ({info.status.value}, driver registered: " \
                   f"{info.driver_info is not None}); nothing to kill"
        os.kill(int(info.driver_info.pid), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while self.client.get_job_status(job_id) == JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.5)
        done = len(self.batch_out.read_text().splitlines()) if self.batch_out.exists() else 0
        self._submit()
        return f"SIGKILL to driver pid {info.driver_info.pid} ({done} results written); resubmitted"

    def _inject_kv(self) -> str:
        """Fill the KV cache: long offline requests straight to the endpoint (no batch
        admission), with the offline budget pinned wide open for the phase, as a misconfigured
        cap would leave it (under the controller's own budget they would not fill it: a few run,
        the rest wait without KV). Chat arriving then must preempt them to be served."""
        import openai
        import ray

        from orchestrator.control.controller import get_controller
        from profiler.workload import make_prompt

        o = self.opts
        seqs = max(o.kv_fill_requests, 1)
        ray.get(get_controller().set_override.remote({"max_offline_seqs": [seqs], "max_offline_tokens": [2048]}),
                timeout=30)

        def one(i: int) -> None:
            try:
                openai.OpenAI(base_url=self.stack.endpoint, api_key="unused", max_retries=0,
                              timeout=o.request_timeout_s * 4).chat.completions.create(
                    model=self.stack.model, max_tokens=o.kv_output_tokens,
                    messages=[{"role": "user", "content": make_prompt(o.kv_prompt_tokens, f"faults-kv-{i}")}],
                    extra_body={"request_class": "offline", "ignore_eos": True})
            except Exception:  # noqa: BLE001 - offline pressure; its outcome is not measured
                pass

        self.kv_threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(o.kv_fill_requests)]
        for t in self.kv_threads:
            t.start()
        return (f"{o.kv_fill_requests} offline requests of {o.kv_prompt_tokens}+{o.kv_output_tokens} tokens, "
                f"offline budget pinned at {seqs} sequences for the phase")

    def _after_kv(self) -> None:
        import ray

        from orchestrator.control.controller import get_controller

        ray.get(get_controller().set_override.remote(None), timeout=30)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colours = {"ok": "tab:blue", "clean_error": "tab:orange", "error": "tab:red", "hung": "black"}
    for outcome, colour in colours.items():
        pts = [(r["start_s"], r["ttft_ms"] if r["ttft_ms"] is not None else result["slo"]["ttft_p99_ms"] * 2)
               for r in recs if r["outcome"] == outcome]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=9, c=colour, label=f"{outcome} ({len(pts)})")
    ax.axhline(result["slo"]["ttft_p99_ms"], color="grey", ls="--", lw=1, label="TTFT SLO")
    for f in result["faults"]:
        ax.axvline(f["at_s"], color="tab:red", lw=1)
        ax.text(f["at_s"], ax.get_ylim()[1], f" {f['fault']}", va="top", fontsize=8, color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the chat load started")
    ax.set_ylabel("chat TTFT (ms; failed requests at 2x the SLO)")
    job = result["job"]
    ax.set_title(f"Faults under load: batch job {job['num_unique']}/{job['num_inputs']} results, "
                 f"{job['num_duplicates']} duplicates")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(result: dict[str, Any]) -> str:
    def s(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [f"SLO: TTFT {result['slo']['ttft_p99_ms']:.0f} ms, TPOT {result['slo']['tpot_p99_ms']:.0f} ms "
             f"(each request; 'SLO again' = first {result['options']['slo_run']} consecutive requests that met it)",
             f"{'fault':<11} {'job on':>6} {'in flight':>9} {'ok':>4} {'clean err':>9} {'other err':>9} {'hung':>4} "
             f"{'new chat s':>10} {'SLO again s':>11} {'attain after':>12} {'KV max':>6} {'preempt':>7}"]
    for f in result["faults"]:
        lines.append(f"{f['fault']:<11} {'yes' if f.get('job_running') else 'no':>6} {f['in_flight']:>9} {f['in_flight_ok']:>4} {f['in_flight_clean_error']:>9} "
                     f"{f['in_flight_error']:>9} {f['in_flight_hung']:>4} {s(f['new_chat_served_after_s']):>10} "
                     f"{s(f['slo_holds_again_after_s']):>11} "
                     f"{'-' if f['attainment_after'] is None else format(f['attainment_after'], '.2f'):>12} "
                     f"{'-' if f.get('kv_cache_usage_max') is None else format(f['kv_cache_usage_max'], '.0%'):>6} "
                     f"{int(f.get('num_offline_preempted') or 0):>7}")
        for e in f["errors"]:
            lines.append(f"{'':<11} error: {e}")
    j, c = result["job"], result["chat"]
    lines.append(f"batch job: {j['num_unique']}/{j['num_inputs']} inputs answered, {j['num_duplicates']} duplicates, "
                 f"{j['num_missing']} missing, status codes {j['status_codes']}, {len(j['submissions'])} submissions, "
                 f"final status {j['status']}: exactly once = {j['exactly_once']}")
    lines.append(f"chat: {c['num']} requests: {c['ok']} ok, {c['clean_error']} clean errors, {c['error']} other "
                 f"errors, {c['hung']} hung; SLO met by {0 if c['attainment'] is None else c['attainment']:.1%}")
    peaks = [f["num_ongoing_max"] for f in result["faults"] if f.get("num_ongoing_max") is not None]
    if peaks:
        cap = result.get("max_ongoing_requests")
        verdict = "" if cap is None else (f" of Serve's max_ongoing_requests {cap}: " + (
            "chat never queued at the router" if max(peaks) < cap else "a replica was full; chat may have queued"))
        lines.append(f"Serve's router: at most {max(peaks)} requests held by one replica (sampled each second){verdict}")
    return "\n".join(lines)


def run_faults(config, opts: FaultsOptions, out_dir: Path, on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring a stack of `config` up (its own), run the faults, tear it down."""
    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.control.slo import load_slo

    if cluster.StackState.load() is not None:
        raise cluster.StackError("a stack is already up; `colocate faults` brings up its own (run `colocate down`)")
    targets = load_slo(config.controller.slo_path, {config.model.id}).models[config.model.id]
    slo = {"ttft_p99_ms": targets.ttft_p99_ms, "tpot_p99_ms": targets.tpot_p99_ms}
    state = cluster.bring_up(config, on_progress=on_progress)
    try:
        stack = Stack(endpoint=state.endpoint, model=config.model.id, gcs_address=state.address,
                      dashboard_url=state.dashboard_url, app_name=config.serve.app_name,
                      max_ongoing_requests=config.replicas.effective_max_ongoing_requests)
        return FaultRun(stack, opts, out_dir, slo, on_progress).run()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for line in cluster.teardown(state):
            on_progress(f"[faults] {line}")
