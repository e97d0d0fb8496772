"""`colocate demo`: chat traffic and a batch job on the same replica, under a controller that
decides from a model of this host's engine.

What it does, in order (each phase is shown on one live progress line; Ray's and vLLM's own
output goes to `demo.log` in the run's directory, `.colocate/demo/<time>/`):

1. Profile this host's engine: a short sweep (`profiler.sweep.profile`) on an engine built exactly
   as a replica's, in a subprocess whose output goes to the log. Its engine starts (about 100 s
   of vLLM imports and process spawns on 2 cores) once the Ray cluster is up, beside the replica's
   start; the sweep itself waits until the stack is healthy and idle, so that the steps it times
   are not slowed by a replica starting beside them.
2. Train the step-latency model on that sweep (`latency_model.model.train`) and hand it to the
   controller. `bring_up` started the controller pointing at the model's directory before the
   model existed; once the model is saved the controller is restarted (it restarts on failure and
   comes back from its GCS checkpoint), and loads it.
3. Submit the batch job (Ray Jobs), a backlog of offline requests, with the offline budget pinned
   to 0 (its requests wait in the engine), and replay the chat requests of step 4 alone (or the
   first `reference_s` of the trace, if given).
   The SLO in force becomes `slo_factor` x the p99 TTFT and TPOT measured there, written to the
   run's own copy of the SLO file (the controller re-reads it within 2 s; manifests/slo.yaml is
   never touched).
4. Release the budget to the controller and replay `duration_s` of the same trace beside the batch
   job. The controller's status (budgets, throttle state, engine counters) is sampled every second,
   and the batch output's new results are stamped as they appear. The job stops with the chat.
5. Summarize (SLO attainment with its Wilson interval, TTFT/TPOT percentiles, offline output
   tokens/s, throttling), write `summary.json`, `timeline.json` and `timeseries.png`, and stop
   everything it started.

The arithmetic (attainment, percentiles, throttle counting, rates, the summary and the progress
line) lives in pure functions at the top of this module, unit-tested without Ray or vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from orchestrator.stats import percentile, wilson_interval

DEMO_DIR = Path(".colocate/demo")
PROFILE_SCENARIOS = 30
"""Sweep size. Measured on 2 shared cores: 30 scenarios, ~1,200 steps, 20 s of stepping (the
engine's start-up before it, ~100 s, overlaps the stack's); hold-out median MAPE 0.50 against a
timing noise floor of 0.22. 10 scenarios (5 s) gave a model with a hold-out MAPE of 0.87."""
SLO_FACTOR = 1.5
REFERENCE_S: float | None = None
"""Seconds of the trace replayed alone for the SLO; None: the co-located window's own requests.
A p99 over n requests is about their slowest: over 15 requests (the first form, 15 s) the
derived TPOT target moved 3x between three runs on one host (26, 18, 8 ms; chat alone p50 2-4 ms,
its p99 one outlier), and the co-located window's 45 requests, judged against it, met it 69-80%
of the time with the budget at a median of 0-9 sequences. Alone over the same 45 requests, the
target is set by the same requests it is then held to."""
SAMPLE_PERIOD_S = 1.0
NUM_OFFLINE = 5000
"""The batch job is a backlog that outlasts the chat window: it is stopped with the chat, and its
results so far are kept (resubmitting the same job would resume it). The tiny model completes
8-40 of these requests a second on 2 cores, by the host (1,000 ran dry 25 s into the 45-s window
on a fast one)."""
PLACEHOLDER_SLO = {"ttft_p99_ms": 600000.0, "tpot_p99_ms": 60000.0}
"""Targets in force until chat alone has been measured: none that anything here could approach,
so the controller's feedback is not throttling against an SLO this host was never measured for
when co-location begins."""
ZERO_BUDGET = {"max_offline_seqs": [0], "max_offline_tokens": [0]}


# --- pure parts ---------------------------------------------------------------------------


def chat_rows(results: Iterable[Any], phase: str, t_offset_s: float) -> list[dict[str, Any]]:
    """One row per chat request (a `profiler.workload.ChatResult`): when it arrived (seconds since
    the demo's timeline began), its TTFT and TPOT in ms, and whether it succeeded."""
    return [{"phase": phase, "t": t_offset_s + r.arrival_s,
             "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1000.0,
             "tpot_ms": None if r.tpot_s is None else r.tpot_s * 1000.0, "ok": bool(r.ok)}
            for r in results]


def meets_slo(row: dict[str, Any], slo: dict[str, float]) -> bool:
    """A request meets the SLO when it succeeded, its first token came within the TTFT target and
    its tokens after the first came at most the TPOT target apart (no TPOT: a one-token reply)."""
    return bool(row["ok"] and row["ttft_ms"] is not None and row["ttft_ms"] <= slo["ttft_p99_ms"]
                and (row["tpot_ms"] is None or row["tpot_ms"] <= slo["tpot_p99_ms"]))


def chat_stats(rows: list[dict[str, Any]], slo: dict[str, float] | None = None) -> dict[str, Any]:
    """Percentiles of a window's chat requests and, given an SLO, its attainment (share of the
    window's requests meeting both targets) with the 95% Wilson interval."""
    ok = [r for r in rows if r["ok"]]
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    tpot = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
    out: dict[str, Any] = {
        "num_requests": len(rows), "num_ok": len(ok),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
    }
    if slo is not None:
        met = sum(meets_slo(r, slo) for r in rows)
        out["num_met"] = met
        out["attainment"] = met / len(rows) if rows else None
        out["attainment_ci95"] = list(wilson_interval(met, len(rows)))
    return out


def reference_slo(reference: dict[str, Any], factor: float = SLO_FACTOR) -> dict[str, float]:
    """The demo's SLO: `factor` x the p99 TTFT and TPOT that chat got alone on this host."""
    if reference.get("ttft_p99_ms") is None or reference.get("tpot_p99_ms") is None:
        raise RuntimeError(f"the chat-alone window gave no latencies ({reference['num_ok']}/"
                           f"{reference['num_requests']} requests succeeded); see the log")
    return {"ttft_p99_ms": round(reference["ttft_p99_ms"] * factor, 1),
            "tpot_p99_ms": round(reference["tpot_p99_ms"] * factor, 1)}


def slo_file_text(text: str, model_id: str, slo: dict[str, float]) -> str:
    """The SLO file `text` with `model_id`'s targets replaced by `slo` (other fields and models kept)."""
    import yaml

    doc = yaml.safe_load(text)
    entry = doc.setdefault("models", {}).setdefault(model_id, {})
    entry.update(ttft_p99_ms=float(slo["ttft_p99_ms"]), tpot_p99_ms=float(slo["tpot_p99_ms"]))
    return yaml.safe_dump(doc, sort_keys=False)


def _by_replica(samples: list[dict[str, Any]], t0: float, t1: float) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(samples, key=lambda s: s["t"]):
        if t0 <= s["t"] <= t1:
            rows.setdefault(s["replica_id"], []).append(s)
    return rows


def counter_rate(samples: list[dict[str, Any]], key: str, t0: float, t1: float) -> float | None:
    """Mean rate of a cumulative engine counter over [t0, t1], summed over replicas."""
    total, spans = 0.0, []
    for rows in _by_replica(samples, t0, t1).values():
        rows = [r for r in rows if r.get(key) is not None]
        if len(rows) >= 2:
            total += rows[-1][key] - rows[0][key]
            spans.append(rows[-1]["t"] - rows[0]["t"])
    return total / max(spans) if spans and max(spans) > 0 else None


def rate_series(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(times, per-second rate) of a cumulative counter between consecutive samples, summed over
    replicas at each sampling round (rounds are grouped by the sample's `round`)."""
    by_round: dict[int, dict[str, Any]] = {}
    for s in samples:
        if s.get(key) is not None:
            r = by_round.setdefault(s["round"], {"t": s["t"], "values": {}})
            r["values"][s["replica_id"]] = s[key]
    rounds = [by_round[k] for k in sorted(by_round)]
    times, rates = [], []
    for prev, cur in zip(rounds, rounds[1:]):
        dt = cur["t"] - prev["t"]
        common = set(prev["values"]) & set(cur["values"])
        if dt > 0 and common:
            times.append(cur["t"])
            rates.append(max(0.0, sum(cur["values"][r] - prev["values"][r] for r in common)) / dt)
    return times, rates


def throttle_stats(samples: list[dict[str, Any]], t0: float, t1: float, wall0: float,
                   wall1: float) -> dict[str, Any]:
    """How often and how fast the co-located window throttled offline work.

    - `episodes`: the controller's transitions into "throttled" (its feedback term halving the
      budget because observed p99s neared the SLO), counted per replica between samples;
    - `throttled_share`: the share of samples in which a replica was throttled;
    - `reactions_ms`: the engines' own reactions to chat bursts (ms from the step before a burst
      to the first step with less offline work), the per-step budget table at work;
    - the offline budget (sequences at the current online load) the controller gave over the window.
    """
    episodes = 0
    states: list[str] = []
    scales: list[float] = []
    budgets: list[float] = []
    reactions: dict[tuple[str, float], float] = {}
    for rows in _by_replica(samples, t0, t1).values():
        prev = None
        for r in rows:
            state = r.get("throttle")
            if state is not None:
                states.append(state)
                if state == "throttled" and prev not in (None, "throttled"):
                    episodes += 1
                prev = state
            if r.get("throttle_scale") is not None:
                scales.append(r["throttle_scale"])
            if r.get("offline_budget_seqs") is not None:
                budgets.append(r["offline_budget_seqs"])
        # A window that opens throttled counts as one episode.
        if rows and rows[0].get("throttle") == "throttled":
            episodes += 1
    for s in samples:
        for started, ms in s.get("throttle_reactions") or []:
            if wall0 <= started <= wall1:
                reactions[(s["replica_id"], started)] = ms
    ms = sorted(reactions.values())
    return {
        "episodes": episodes,
        "throttled_share": states.count("throttled") / len(states) if states else None,
        "min_scale": min(scales) if scales else None,
        "budget_seqs_min": min(budgets) if budgets else None,
        "budget_seqs_median": statistics.median(budgets) if budgets else None,
        "budget_seqs_max": max(budgets) if budgets else None,
        "num_reactions": len(ms),
        "reaction_ms_median": statistics.median(ms) if ms else None,
        "reaction_ms_max": ms[-1] if ms else None,
    }


def offline_output(results: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Offline output (decode) tokens from the batch results that came back within [t0, t1]
    (each result stamped `t` when the demo saw it in the job's output file)."""
    done = [r for r in results if t0 <= r["t"] <= t1]
    ok = [r for r in done if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    span = t1 - t0
    return {"num_results": len(done), "num_ok": len(ok), "completion_tokens": tokens,
            "tokens_per_s": tokens / span if span > 0 else None}


def result_row(record: dict[str, Any], t: float) -> dict[str, Any]:
    """A batch output record (OpenAI Batch output JSONL) as the demo counts it."""
    response = record.get("response") or {}
    ok = response.get("status_code") == 200 and not record.get("error")
    usage = (response.get("body") or {}).get("usage") or {}
    return {"t": t, "custom_id": record.get("custom_id"), "ok": ok,
            "completion_tokens": int(usage.get("completion_tokens") or 0) if ok else 0}


def build_summary(*, slo: dict[str, float], reference: dict[str, Any], rows: list[dict[str, Any]],
                  samples: list[dict[str, Any]], results: list[dict[str, Any]], alone: dict[str, float],
                  window: dict[str, float], batch: dict[str, Any], model: dict[str, Any],
                  timings: dict[str, float]) -> dict[str, Any]:
    """Everything the demo reports, from what it recorded. `alone` and `window` hold the chat-alone
    and co-located windows' bounds on the demo's timeline (t0, t1) and on the wall clock (wall0,
    wall1). `warnings` names what makes the numbers less than they seem."""
    t0, t1 = window["t0"], window["t1"]
    colocated = [r for r in rows if r["phase"] == "colocated"]
    out = offline_output(results, t0, t1)
    admitted = counter_rate(samples, "num_offline_tokens_total", t0, t1)
    batch_done = [r["t"] for r in results]
    warnings = []
    # The engine's own counter, not the results: a result that shows up in the window may have
    # been computed before it (the job writes it after the reply, the demo looks once a second).
    held_admitted = counter_rate(samples, "num_offline_tokens_total", alone["t0"], alone["t1"])
    if (held_admitted or 0) > 0:
        warnings.append(f"offline work ran while chat was measured alone ({held_admitted:.0f} offline tokens/s "
                        "admitted): the engine was on its safe fallback budget (the controller's budget came "
                        "late), so the reference and the SLO made from it are looser than chat alone")
    online = counter_rate(samples, "num_online_tokens_total", t0, t1)
    if colocated and not online:
        warnings.append("the controller saw no chat tokens in the engine's counters during the co-located "
                        "window: the replica's engine telemetry did not reach it (see the log), so its budget "
                        "was not decided on this load")
    return {
        "slo": {**slo, "factor": SLO_FACTOR, "source": f"{SLO_FACTOR:g} x chat-alone p99"},
        "reference": reference,
        "chat": chat_stats(colocated, slo),
        "offline": {**out, "admitted_tokens_per_s": admitted, "window_s": t1 - t0,
                    "batch_finished_at_s": max(batch_done) - t0 if batch_done and batch.get("finished") else None},
        "batch": {**batch, "num_results": len(results), "num_ok": sum(r["ok"] for r in results),
                  "completion_tokens": sum(r["completion_tokens"] for r in results)},
        "throttle": throttle_stats(samples, t0, t1, window["wall0"], window["wall1"]),
        "model": model,
        "timings_s": timings,
        "warnings": warnings,
    }


def _ms(v: float | None) -> str:
    return f"{v:.0f} ms" if v is not None else "n/a"


def _n(v: float | None) -> str:
    return f"{v:g}" if v is not None else "n/a"


def format_summary(summary: dict[str, Any]) -> str:
    s, c, o, b, th, m = (summary[k] for k in ("slo", "chat", "offline", "batch", "throttle", "model"))
    ref = summary["reference"]
    lo, hi = c["attainment_ci95"]
    attain = "n/a" if c["attainment"] is None else f"{100 * c['attainment']:.1f}%"
    finished = ("" if o.get("batch_finished_at_s") is None
                else f"; the batch job finished {o['batch_finished_at_s']:.0f} s into the window")
    react = ("no chat bursts beside offline work" if not th["num_reactions"] else
             f"{th['num_reactions']} chat bursts cut offline work within {_ms(th['reaction_ms_median'])} "
             f"(median; max {_ms(th['reaction_ms_max'])})")
    episodes = th["episodes"]
    share = th["throttled_share"]
    lines = [
        "",
        "Colocate demo: chat and a batch job on the same replica",
        f"  latency model   this host's engine: {m.get('num_steps')} profiled steps in {m.get('sweep_s')} s, "
        f"hold-out median error {100 * (m.get('median_mape') or 0):.0f}% "
        f"(timing noise {100 * (m.get('timing_noise_floor') or 0):.0f}%)",
        f"  SLO in force    TTFT p99 <= {_ms(s['ttft_p99_ms'])}, TPOT p99 <= {_ms(s['tpot_p99_ms'])} "
        f"({s['source']}: {_ms(ref['ttft_p99_ms'])} / {_ms(ref['tpot_p99_ms'])} over "
        f"{ref['num_requests']} requests)",
        f"  chat            {c['num_ok']}/{c['num_requests']} ok; {attain} met the SLO "
        f"({c['num_met']}/{c['num_requests']}; 95% interval {100 * lo:.1f}-{100 * hi:.1f}%)",
        f"  chat TTFT       p50 {_ms(c['ttft_p50_ms'])}, p99 {_ms(c['ttft_p99_ms'])} "
        f"(alone: {_ms(ref['ttft_p50_ms'])}, {_ms(ref['ttft_p99_ms'])})",
        f"  chat TPOT       p50 {_ms(c['tpot_p50_ms'])}, p99 {_ms(c['tpot_p99_ms'])} "
        f"(alone: {_ms(ref['tpot_p50_ms'])}, {_ms(ref['tpot_p99_ms'])})",
        f"  offline         {o['tokens_per_s']:.1f} output tokens/s beside chat ({o['completion_tokens']} tokens, "
        f"{o['num_results']} results in the {o['window_s']:.0f} s window{finished})"
        if o["tokens_per_s"] is not None else "  offline         n/a",
        f"  batch job       {b['status']}: {b['num_results']}/{b['num_requests']} results "
        f"({b['num_ok']} ok, {b['completion_tokens']} output tokens)",
        f"  throttling      {episodes} controller throttle episode{'s' if episodes != 1 else ''}"
        + (f" ({100 * share:.0f}% of the window)" if share else "")
        + f"; offline budget {_n(th['budget_seqs_min'])}-{_n(th['budget_seqs_max'])} seqs "
        f"(median {_n(th['budget_seqs_median'])}); {react}",
    ]
    for w in summary.get("warnings") or []:
        lines.append(f"  warning         {w}")
    if summary.get("chat_errors"):
        lines.append(f"  chat errors     {summary['chat_errors']}")
    t = summary.get("timings_s") or {}
    if t:
        lines.append(f"  time            {sum(t.values()):.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    return "\n".join(lines)


@dataclass
class ProgressState:
    phase: str = "starting"
    started_s: float = field(default_factory=time.monotonic)
    chat_done: int | None = None
    chat_total: int | None = None
    batch_done: int | None = None
    batch_total: int | None = None
    budget_seqs: int | None = None
    detail: str = ""


def progress_line(p: ProgressState, now_s: float, width: int | None = None) -> str:
    """`[demo 1:42] co-located | chat 20/45 | batch 31/60 | offline budget 6 seqs | detail`."""
    elapsed = max(0, int(now_s - p.started_s))
    parts = [f"[demo {elapsed // 60}:{elapsed % 60:02d}] {p.phase}"]
    if p.chat_total is not None:
        parts.append(f"chat {p.chat_done or 0}/{p.chat_total}")
    if p.batch_total is not None:
        parts.append(f"batch {p.batch_done or 0}/{p.batch_total}")
    if p.budget_seqs is not None:
        parts.append(f"offline budget {p.budget_seqs} seqs")
    if p.detail:
        parts.append(p.detail)
    line = " | ".join(parts)
    if width is not None and len(line) > width:
        line = line[:max(0, width - 1)] + "…"
    return line


# --- the live parts -----------------------------------------------------------------------


class Display:
    """One progress line, rewritten in place on a terminal; plain lines every `plain_every_s`
    (and at every phase change) when the stream is not a terminal."""

    def __init__(self, stream: TextIO, plain_every_s: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.state = ProgressState()
        self.plain_every_s = plain_every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_plain = 0.0
        self._shown = False

    def start(self) -> Display:
        self._thread = threading.Thread(target=self._loop, name="demo-progress", daemon=True)
        self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        with self._lock:
            phase_changed = "phase" in fields and fields["phase"] != self.state.phase
            for k, v in fields.items():
                setattr(self.state, k, v)
            if phase_changed and "detail" not in fields:
                self.state.detail = ""
        if phase_changed:
            self._draw(force_plain=True)

    def note(self, message: str) -> None:
        """A line kept on screen above the progress line (on a terminal) or printed as it is."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + message + "\n")
            else:
                self.stream.write(message + "\n")
            self.stream.flush()
        self._draw()

    def _draw(self, force_plain: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self.stream.write("\r\x1b[K" + progress_line(self.state, now, width))
                self._shown = True
            elif force_plain or now - self._last_plain >= self.plain_every_s:
                self.stream.write(progress_line(self.state, now) + "\n")
                self._last_plain = now
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._draw()
            except Exception:  # noqa: BLE001 - the display must never stop the demo
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K")
            self.stream.flush()


class _LogFile(logging.FileHandler):
    """The demo's log file, in one format: Ray (at `ray.init`) and Serve re-format every handler
    they find on their loggers, which turned half of the log into JSON."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        pass


class LogsToFile:
    """While active, the process's stdout and stderr (file descriptors 1 and 2, so C++ and
    subprocess output too) and Python logging (the `ray` loggers, warnings, everything) go to
    `path`; `terminal` is a stream on the original stderr, for the progress line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> LogsToFile:
        import ray  # noqa: F401 - Ray installs its "ray" logger's stream handler at import

        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
        self.terminal = os.fdopen(os.dup(self._saved_fds[2]), "w", buffering=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd in (1, 2):
            os.dup2(log_fd, fd)
        os.close(log_fd)
        self.handler = _LogFile(self.path)
        self._saved_loggers = {}
        for name in ("", "ray"):
            logger = logging.getLogger(name)
            self._saved_loggers[name] = (logger.handlers[:], logger.level, logger.propagate)
        self.reroute()
        logging.captureWarnings(True)
        return self

    def reroute(self) -> None:
        """(Again) the log file as the only handler of the root and `ray` loggers: connecting to
        Ray replaces the root logger's handlers with its own (JSON lines on stderr)."""
        for name in ("", "ray"):
            logging.getLogger(name).handlers = [self.handler]
        logging.getLogger().setLevel(logging.INFO)

    def __exit__(self, *exc: Any) -> None:
        logging.captureWarnings(False)
        for name, (handlers, level, propagate) in self._saved_loggers.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        self.handler.close()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.terminal.close()


class ResultTail:
    """New complete lines of the batch job's output file, each stamped with when it was seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def poll(self, t: float) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n")
        if end < 0:
            return 0
        self.offset += end + 1
        new = 0
        for line in data[:end].splitlines():
            try:
                self.rows.append(result_row(json.loads(line), t))
                new += 1
            except ValueError:
                logging.getLogger(__name__).warning("demo: unreadable batch output line %r", line[:200])
        return new


class Sampler:
    """Every `period_s`: the controller's per-replica status (budgets, throttle state, engine
    counters), chat requests completed per the replica registry, and the batch output's new
    results. Runs in a thread, across every phase; errors (a restarting controller) are skipped."""

    KEYS = ("online_requests", "offline_running", "offline_waiting", "offline_budget_seqs", "throttle",
            "throttle_scale", "num_offline_tokens_total", "num_online_tokens_total", "throttle_reactions",
            "observed_ttft_p99_ms", "observed_tpot_p99_ms", "predicted_step_ms", "model_calibration",
            "slo_ttft_p99_ms", "slo_tpot_p99_ms")

    def __init__(self, clock: _Clock, display: Display, tail: ResultTail, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.clock = clock
        self.display = display
        self.tail = tail
        self.period_s = period_s
        self.samples: list[dict[str, Any]] = []
        self.status: dict[str, Any] | None = None
        self.chat_completed: int | None = None
        self.phase = ""
        self._round = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample_once()
            except Exception as err:  # noqa: BLE001 - a missed sample is fine
                logging.getLogger(__name__).info("demo: sample failed: %s", err)
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def sample_once(self) -> None:
        import ray

        from orchestrator.control.controller import get_controller
        from orchestrator.serving.registry import get_or_create_registry

        t = self.clock.now()
        self.tail.poll(t)
        self.display.update(batch_done=len(self.tail.rows))
        status = ray.get(get_controller().status.remote(), timeout=5)
        self.status = status
        self._round += 1
        for r in status["replicas"]:
            self.samples.append({"t": t, "round": self._round, "phase": self.phase,
                                 "replica_id": r["replica_id"], **{k: r.get(k) for k in self.KEYS}})
        budgets = [r.get("offline_budget_seqs") for r in status["replicas"] if r.get("offline_budget_seqs") is not None]
        if budgets:
            self.display.update(budget_seqs=sum(budgets))
        reports = ray.get(get_or_create_registry().snapshot.remote(), timeout=5)
        self.chat_completed = sum((r.get("num_completed") or {}).get("online", 0) for r in reports)


def _kill_tree(pid: int) -> None:
    """Stop a process this demo started and everything it spawned (by pid, never by name)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


class ProfileRun:
    """The profile, in a subprocess (`python -m bench.demo profile-worker`) writing to the log.
    It starts its engine at once and waits at `gate` before stepping it."""

    def __init__(self, config_path: Path, work: Path, num_scenarios: int, log: Path) -> None:
        self.steps = work / "profile-steps.parquet"
        self.summary_path = work / "profile.json"
        self.ready = work / "profile.engine-ready"
        self.gate = work / "profile.go"
        self.steps_ready = work / "profile.steps.json"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.demo", "profile-worker", str(config_path), str(self.steps),
                 str(num_scenarios), str(self.ready), str(self.gate), str(self.steps_ready),
                 str(self.summary_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def engine_ready(self) -> bool:
        return self.ready.exists()

    def release(self) -> None:
        self.gate.touch()

    def check(self) -> None:
        if self.proc.poll() not in (None, 0):
            raise RuntimeError(f"the profile exited with code {self.proc.returncode}; see {self.log}")

    def wait_for_steps(self, timeout_s: float) -> dict[str, Any]:
        """The sweep's steps, once written (the engine may still be shutting down)."""
        deadline = time.monotonic() + timeout_s
        while not self.steps_ready.exists():
            self.check()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the profile exited without writing its steps; see {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the profile did not finish within {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.25)
        return json.loads(self.steps_ready.read_text())

    def stop_in_background(self) -> threading.Thread:
        """Stop the profile's engine now that its steps are written (its orderly shutdown took
        ~10 s on 2 cores, spent waiting for its worker), while the caller goes on."""
        thread = threading.Thread(target=self.kill, name="demo-profile-stop", daemon=True)
        thread.start()
        return thread

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_tree(self.proc.pid)


def _profile_worker(argv: list[str]) -> int:
    """The profile subprocess: `profiler.sweep.profile` with the sweep held until the parent
    opens the gate (the engine starts while the stack does; the steps are timed on a quiet host)."""
    config_path, out, num_scenarios, ready, gate, steps_ready, summary_path = argv
    from orchestrator.config import load_config
    from orchestrator.engine.channel import rows_to_columns
    from orchestrator.engine.telemetry import export_parquet
    from profiler import sweep

    parent = os.getppid()
    run_sweep = sweep.run_sweep

    sweep_s: list[float] = []

    def gated(*args: Any, **kwargs: Any):
        Path(ready).touch()
        print("profile: engine ready; waiting for the stack before stepping it", flush=True)
        while not Path(gate).exists():
            if os.getppid() != parent:
                raise SystemExit("profile: the demo went away")
            time.sleep(0.2)
        started = time.monotonic()
        rows = run_sweep(*args, **kwargs)
        sweep_s.append(round(time.monotonic() - started, 1))
        # The steps are written now, as `profile` writes them after shutting its engine down: the
        # demo trains on them while the engine's shutdown (~10 s on 2 cores) runs.
        export_parquet(rows_to_columns(rows), Path(out))
        Path(steps_ready).write_text(json.dumps({"dataset": out, "num_steps": len(rows), "sweep_s": sweep_s[0],
                                                 "num_scenarios": int(num_scenarios)}))
        return rows

    sweep.run_sweep = gated
    summary = sweep.profile(load_config(config_path), Path(out), num_scenarios=int(num_scenarios), seed=0,
                            on_progress=lambda m: print(m, flush=True))
    # The profile's own elapsed_s includes the wait at the gate; the sweep's own time is this.
    summary["sweep_s"] = sweep_s[0] if sweep_s else None
    Path(summary_path).write_text(json.dumps(summary, indent=1) + "\n")
    print("profile: " + json.dumps(summary), flush=True)
    return 0


@dataclass
class DemoOptions:
    duration_s: float = 45.0
    chat_rate_per_s: float = 1.0
    num_offline: int = NUM_OFFLINE
    reference_s: float | None = REFERENCE_S
    profile_scenarios: int = PROFILE_SCENARIOS
    keep: bool = False
    out_dir: Path | None = None


def run_demo(config, opts: DemoOptions) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to `summary.json`). Progress goes to the
    terminal (stderr); everything else to the run's `demo.log`."""
    from orchestrator.cluster import lifecycle as cluster
    from profiler.workload import ARXIV_LENGTHS, AZURE_CONV

    if not (AZURE_CONV.exists() and ARXIV_LENGTHS.exists()):
        raise FileNotFoundError(f"workload traces not found under {AZURE_CONV.parent}")
    if cluster.StackState.load() is not None:
        raise cluster.StackError("a stack is already up; `colocate demo` brings up its own (run `colocate down`)")
    if config.cluster.address:
        raise cluster.StackError("`colocate demo` starts a local cluster of its own (cluster.address must be null)")
    if cluster.port_in_use(config.serve.host, config.serve.port):
        raise cluster.StackError(f"serve.port {config.serve.port} is already in use on {config.serve.host}; "
                                 "choose another port (-c CONFIG)")
    work = (opts.out_dir or DEMO_DIR / time.strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "demo.log"
    with LogsToFile(log_path) as logs:
        display = Display(logs.terminal).start()
        display.note(f"colocate demo: output in {work}  (Ray and vLLM logs: {log_path})")
        try:
            summary = _run(config, opts, work, display, logs)
        finally:
            display.stop()
    summary["paths"] = {"dir": str(work), "log": str(log_path), "summary": str(work / "summary.json"),
                        "plot": str(work / "timeseries.png")}
    return summary


class _Clock:
    """The demo's timeline (seconds since it began) and the time each step took."""

    def __init__(self) -> None:
        self.t0 = self._mark = time.monotonic()
        self.timings: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self._mark, 1)
        self._mark = now


@dataclass
class _BatchJob:
    job_id: str
    dashboard_url: str
    output: Path
    num_requests: int

    @classmethod
    def submit(cls, config, state, num_requests: int, work: Path) -> _BatchJob:
        from orchestrator.cluster.jobs import submit_batch_job
        from profiler.workload import load_offline_lengths, write_batch_input

        offline = load_offline_lengths(num_requests=num_requests, **_lengths(config))
        batch_in = write_batch_input(offline, work / "batch-input.jsonl", config.model.id, prefix="demo")
        batch_out = work / "batch-output.jsonl"
        job_id = submit_batch_job(
            state.dashboard_url,
            ["--input", str(batch_in), "--output", str(batch_out), "--endpoint", state.endpoint,
             "--model", config.model.id, "--progress-interval-s", "1"],
            metadata={"colocate": "demo", "output": str(batch_out)})
        logging.getLogger("colocate.demo").info("demo: submitted batch job %s: %d offline requests -> %s",
                                                job_id, len(offline), batch_out)
        return cls(job_id, state.dashboard_url, batch_out, len(offline))

    def status(self) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.dashboard_url).get_job_status(self.job_id).value)

    def stop(self) -> None:
        from ray.job_submission import JobSubmissionClient

        try:
            if self.status() in ("PENDING", "RUNNING"):
                JobSubmissionClient(self.dashboard_url).stop_job(self.job_id)
        except Exception as err:  # noqa: BLE001 - the cluster may be gone already
            logging.getLogger("colocate.demo").info("demo: stopping %s: %s", self.job_id, err)


def _lengths(config) -> dict[str, Any]:
    # Lengths scaled into the tiny model's context (the traces' prompts average ~1,100 tokens).
    max_len = int(config.replicas.engine_kwargs.get("max_model_len", 2048))
    return {"length_scale": 0.1, "max_prompt_tokens": max_len // 4, "max_output_tokens": 64}


def _run(config, opts: DemoOptions, work: Path, display: Display, logs: LogsToFile) -> dict[str, Any]:
    import ray

    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.config import dump_config
    from orchestrator.control.controller import get_controller
    from orchestrator.serving.app import resolve_model_source

    log = logging.getLogger("colocate.demo")
    clock = _Clock()

    profile: ProfileRun | None = None

    def start_profile() -> None:
        nonlocal profile
        if profile is None:
            profile = ProfileRun(config_path, work, opts.profile_scenarios, work / "demo.log")

    def detail(msg: str) -> None:
        log.info("demo: %s", msg)
        display.update(detail=msg)
        # The profile's engine starts once the Ray cluster is up (bring_up has recorded it), beside
        # the replica's start: started beside `ray start` as well, on 2 busy cores, the GCS missed
        # its start-up deadline ("The current node timed out during startup").
        if profile is None and cluster.StackState.load() is not None:
            start_profile()

    # The run's own SLO file, which the controller re-reads: placeholder targets until chat alone
    # has been measured (so that nothing is throttled against a target this host was never
    # measured for), then the demo's SLO. And the directory the controller loads its model from.
    slo_file = work / "slo.yaml"
    slo_file.write_text(slo_file_text(Path(config.controller.slo_path).read_text(), config.model.id,
                                      PLACEHOLDER_SLO))
    model_dir = work / "latency-model"
    controller_cfg = config.controller.model_copy(update={
        "slo_path": str(slo_file), "model_path": str(model_dir), "enabled": True})
    config = config.model_copy(update={"controller": controller_cfg})
    display.update(phase="building the model", detail=config.model.source)
    resolve_model_source(config)  # built once here, not by the profile and the stack at once
    config_path = work / "config.yaml"
    config_path.write_text(dump_config(config))

    display.update(phase="starting the stack and this host's profile engine", detail="")
    state = sampler = job = None
    try:
        state = cluster.bring_up(config, on_progress=detail)
        logs.reroute()
        clock.lap("stack start")
        start_profile()
        assert profile is not None
        profile.check()
        cluster.connect(state.address)
        display.update(phase="waiting for the profile engine")
        while not profile.engine_ready():
            profile.check()
            time.sleep(0.5)
        clock.lap("profile engine, beyond the stack")
        display.update(phase=f"profiling this host's engine ({opts.profile_scenarios} scenarios)")
        profile.release()
        prof = profile.wait_for_steps(600)
        stopping = profile.stop_in_background()
        clock.lap("profile sweep")

        # The batch job starts (its requests held at budget 0) while the model is trained.
        ray.get(get_controller().set_override.remote(ZERO_BUDGET), timeout=10)
        job = _BatchJob.submit(config, state, opts.num_offline, work)
        display.update(batch_done=0, batch_total=job.num_requests)
        model_info = _train_and_load(prof, model_dir, display, config.controller.period_s)
        clock.lap("train and load the model")

        sampler = Sampler(clock, display, ResultTail(job.output)).start()
        display.update(phase="starting the batch job (held at budget 0)", detail=job.job_id)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if job.status() not in ("PENDING", "RUNNING"):
                raise RuntimeError(f"batch job {job.job_id} ended before chat started ({job.status()}); "
                                   f"see `ray job logs` or {work / 'demo.log'}")
            rows = (sampler.status or {}).get("replicas") or []
            if sampler.tail.rows or sum((r.get("offline_waiting") or 0) + (r.get("offline_running") or 0)
                                        for r in rows) > 0:
                break
            time.sleep(0.5)
        else:
            log.warning("demo: no request of batch job %s reached the engine within 120 s; going on", job.job_id)
        # Nothing of the profile may run beside the chat-alone reference.
        stopping.join()
        clock.lap("batch job start")
        return _exercise(config, state, opts, work, display, sampler, job, model_info, clock)
    finally:
        if profile is not None:
            profile.kill()
        if sampler is not None:
            sampler.stop()
        if state is not None:
            display.update(phase="stopping what the demo started", chat_total=None, batch_total=None,
                           budget_seqs=None, detail="")
            if job is not None:
                job.stop()
            if not opts.keep:
                try:
                    ray.get(get_controller().set_override.remote(None), timeout=10)
                except Exception:  # noqa: BLE001 - the stack is going away anyway
                    pass
                # Leave the cluster before stopping it: a driver left connected waits on the dead GCS.
                ray.shutdown()
                for line in cluster.teardown(state):
                    log.info("demo: %s", line)
                clock.lap("teardown")
                log.info("demo: timings %s", clock.timings)


def _train_and_load(prof: dict[str, Any], model_dir: Path, display: Display, period_s: float) -> dict[str, Any]:
    """Train the step-latency model on the profile, save it where the controller looks, and
    restart the controller so that it loads it (it comes back from its GCS checkpoint, pinned
    budget included)."""
    import ray

    from latency_model.model import train
    from latency_model.schema import read_steps
    from orchestrator.control.controller import get_controller

    display.update(phase="training the step-latency model", detail=f"{prof['num_steps']} steps")
    model, metrics = train(read_steps(Path(prof["dataset"])))
    model.save(model_dir)
    display.update(phase="handing the model to the controller", detail="")
    time.sleep(3 * period_s)  # a few ticks: the pinned budget is in the controller's checkpoint
    ray.kill(get_controller(), no_restart=False)
    deadline = time.monotonic() + 90
    status: dict[str, Any] = {}
    while not status.get("latency_model"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the controller did not load the latency model from {model_dir} within 90 s "
                               f"({status.get('notes') or 'no answer'})")
        try:
            status = ray.get(get_controller().status.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
            pass  # restarting
        time.sleep(0.5)
    if status.get("override") != ZERO_BUDGET:
        ray.get(get_controller().set_override.remote(ZERO_BUDGET), timeout=10)
    return {"num_steps": prof["num_steps"], "sweep_s": prof.get("sweep_s"), "num_scenarios": prof["num_scenarios"],
            "path": str(model_dir), **{k: metrics.get(k) for k in (
                "median_mape", "p99_coverage", "linear_hygen_mape", "timing_noise_floor", "num_holdout")}}


def _chat(config, state, specs, tag: str, sampler: Sampler, display: Display, phase: str):
    """Replay `specs`; the live line counts the chat requests the replicas completed."""
    import asyncio

    from profiler.workload import run_chat_load

    base = sampler.chat_completed
    display.update(phase=phase, chat_done=0, chat_total=len(specs))
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(0.5):
            if base is not None and sampler.chat_completed is not None:
                display.update(chat_done=min(len(specs), sampler.chat_completed - base))

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        t0, wall0 = sampler.clock.now(), time.time()
        results = asyncio.run(run_chat_load(state.endpoint, config.model.id, specs, prompt_tag=tag))
        t1, wall1 = sampler.clock.now(), time.time()
    finally:
        stop.set()
        watcher.join()
    display.update(chat_done=sum(r.ok for r in results))
    return results, {"t0": t0, "t1": t1, "wall0": wall0, "wall1": wall1}


def _exercise(config, state, opts: DemoOptions, work: Path, display: Display, sampler: Sampler,
              job: _BatchJob, model_info: dict[str, Any], clock: _Clock) -> dict[str, Any]:
    import ray

    from orchestrator.control.controller import get_controller
    from profiler.workload import load_chat_trace

    controller = get_controller()
    specs = load_chat_trace(rate_per_s=opts.chat_rate_per_s, duration_s=opts.duration_s, **_lengths(config))
    reference_specs = specs if opts.reference_s is None else load_chat_trace(
        rate_per_s=opts.chat_rate_per_s, duration_s=opts.reference_s, **_lengths(config))

    # Chat alone (the batch job's requests wait at budget 0): the reference the SLO is made from.
    alone, alone_window = _chat(config, state, reference_specs, "demo-alone", sampler, display,
                                "chat alone (reference for the SLO)")
    clock.lap("chat alone")
    rows = chat_rows(alone, "alone", alone_window["t0"])
    reference = chat_stats(rows)
    slo = reference_slo(reference)
    slo_file = work / "slo.yaml"
    tmp = slo_file.with_name("slo.yaml.tmp")
    tmp.write_text(slo_file_text(slo_file.read_text(), config.model.id, slo))
    tmp.replace(slo_file)
    display.update(phase="setting the SLO", chat_total=None,
                   detail=f"TTFT p99 <= {slo['ttft_p99_ms']:.0f} ms, TPOT p99 <= {slo['tpot_p99_ms']:.0f} ms")
    deadline = time.monotonic() + 10
    while True:
        in_force = ray.get(controller.status.remote(), timeout=5).get("slo") or {}
        if (in_force.get("ttft_p99_ms"), in_force.get("tpot_p99_ms")) == (slo["ttft_p99_ms"], slo["tpot_p99_ms"]):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the controller did not take up the SLO written to {slo_file}")
        time.sleep(0.25)
    display.note(f"SLO in force: TTFT p99 <= {slo['ttft_p99_ms']:.0f} ms, TPOT p99 <= {slo['tpot_p99_ms']:.0f} ms "
                 f"({SLO_FACTOR:g} x chat alone: {reference['ttft_p99_ms']:.0f} / {reference['tpot_p99_ms']:.0f} ms)")

    # Co-located: the controller decides the offline budget.
    sampler.phase = "colocated"
    ray.get(controller.set_override.remote(None), timeout=10)
    results, window = _chat(config, state, specs, "demo-colocated", sampler, display,
                            "chat + batch job, co-located")
    sampler.phase = "after"
    clock.lap("co-located chat")
    rows += chat_rows(results, "colocated", window["t0"])

    # The batch job is a backlog: it stops with the chat (its results so far are kept).
    display.update(phase="stopping the batch job", chat_total=None)
    status = job.status()
    finished = status not in ("PENDING", "RUNNING")
    if not finished:
        job.stop()
        deadline = time.monotonic() + 15
        while job.status() in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(0.5)
        status = "STOPPED at the end of the chat window"
    sampler.tail.poll(clock.now())
    clock.lap("stop the batch job")

    summary = build_summary(
        slo=slo, reference=reference, rows=rows, samples=sampler.samples, results=sampler.tail.rows,
        alone=alone_window, window=window, batch={"job_id": job.job_id, "status": status, "finished": finished,
                              "num_requests": job.num_requests, "output": str(job.output)},
        model=model_info, timings=clock.timings)
    summary["chat_errors"] = sorted({r.error for r in list(alone) + list(results) if r.error})[:5]
    summary["endpoint"] = state.endpoint
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (work / "timeline.json").write_text(json.dumps({"chat": rows, "samples": sampler.samples,
                                                    "batch_results": sampler.tail.rows,
                                                    "alone_window": alone_window, "window": window}) + "\n")
    plot_timeseries(rows, sampler.samples, slo, alone_window, window, work / "timeseries.png")
    return summary


def plot_timeseries(rows: list[dict[str, Any]], samples: list[dict[str, Any]], slo: dict[str, float],
                    alone: dict[str, float], colocated: dict[str, float], path: Path) -> Path:
    """Chat TTFT and TPOT per request against the SLO lines, and the offline work admitted beside
    them, over the demo's timeline: chat alone (offline held at 0), then chat beside the batch job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_start = alone["t0"] - 2.0
    t_end = colocated["t1"] + 3.0
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True, gridspec_kw={"height_ratios": [1, 1, 1.1]})
    legend_kw = {"fontsize": 8, "loc": "lower left", "bbox_to_anchor": (0.0, 1.0), "ncol": 4, "frameon": False,
                 "borderaxespad": 0.2}
    for ax, key, target, label in [(axes[0], "ttft_ms", slo["ttft_p99_ms"], "time to first token (ms)"),
                                   (axes[1], "tpot_ms", slo["tpot_p99_ms"], "time per output token (ms)")]:
        values = []
        for phase, color, name in [("alone", "0.45", "chat alone"),
                                   ("colocated", "tab:blue", "chat beside the batch job")]:
            pts = [(r["t"] - t_start, r[key]) for r in rows if r["phase"] == phase and r["ok"] and r[key] is not None]
            values += [v for _, v in pts]
            within = [(t, v) for t, v in pts if v <= target]
            over = [(t, v) for t, v in pts if v > target]
            if within:
                ax.scatter(*zip(*within), s=18, color=color, label=name, zorder=3)
            if over:
                ax.scatter(*zip(*over), s=34, color="tab:red", marker="x", zorder=4,
                           label=f"{name}: over the target")
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1.3,
                   label=f"SLO: p99 <= {target:.0f} ms")
        ax.set_ylabel(label)
        ax.set_ylim(0, max([target, *values]) * 1.12)
        ax.grid(alpha=0.3)
        ax.legend(**legend_kw)

    ax = axes[2]
    times, rates = rate_series(samples, "num_offline_tokens_total")
    shown = [(t - t_start, r) for t, r in zip(times, rates) if t_start <= t <= t_end]
    if shown:
        ax.fill_between(*zip(*shown), step="pre", alpha=0.3, color="tab:green")
        ax.step(*zip(*shown), where="pre", color="tab:green", label="offline tokens/s admitted (engine counter)")
    ax.set_ylabel("offline tokens/s", color="tab:green")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    by_round: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        if t_start <= s["t"] <= t_end:
            by_round.setdefault(s["round"], []).append(s)
    series: dict[str, tuple[list[float], list[float]]] = {"offline_budget_seqs": ([], []), "online_requests": ([], [])}
    for rnd in sorted(by_round):
        for key, (ts, vs) in series.items():
            vals = [s[key] for s in by_round[rnd] if s.get(key) is not None]
            if vals:
                ts.append(by_round[rnd][0]["t"] - t_start)
                vs.append(sum(vals))
    ax2.step(*series["offline_budget_seqs"], where="post", color="tab:purple", linewidth=1.3,
             label="offline budget (sequences, at the chat load of the moment)")
    ax2.step(*series["online_requests"], where="post", color="tab:orange", linewidth=1.0, alpha=0.9,
             label="chat requests in the engine")
    ax2.set_ylabel("sequences")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, **{**legend_kw, "ncol": 2})
    ax.set_xlabel("seconds into the chat replay")
    ax.set_xlim(0, t_end - t_start)
    for a in axes:
        a.axvspan(alone["t0"] - t_start, alone["t1"] - t_start, color="0.88", zorder=0)
        a.axvspan(colocated["t0"] - t_start, colocated["t1"] - t_start, color="tab:blue", alpha=0.06, zorder=0)
    for (t0, t1), text in [((alone["t0"], alone["t1"]), "chat alone\n(offline held at 0)"),
                           ((colocated["t0"], colocated["t1"]), "chat + batch job\n(the controller decides)")]:
        ax.text((t0 + t1) / 2 - t_start, 0.96, text, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.85})
    fig.suptitle(f"Colocate demo: chat and a batch job on one replica, SLO TTFT p99 <= {slo['ttft_p99_ms']:.0f} ms, "
                 f"TPOT p99 <= {slo['tpot_p99_ms']:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "profile-worker":
        sys.exit(_profile_worker(sys.argv[2:]))
    sys.exit("usage: python -m bench.demo profile-worker CONFIG OUT SCENARIOS READY GATE STEPS_READY SUMMARY")
