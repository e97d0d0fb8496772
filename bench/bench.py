"""`colocate bench`: trace replay against the baselines, side by side, in one run.

One stack (the bench model by default), one online load (the Azure chat trace, inter-arrival
times scaled to `--rate`, lengths scaled to the model's context) and one offline backlog (a Ray
batch job of requests with the arXiv summarization lengths), run under each policy in turn:

- online-only: offline budget pinned to 0, no job (reference latency; the SLO derives from it);
- batch-size sweep: offline streams alone at a steady batch b, to find the largest b whose TPOT
  meets the SLO (the SLO-bounded throughput);
- offline-only: the job alone, budget unlimited (the throughput ceiling);
- colocate: the job beside chat under the controller's policy;
- static caps: the job beside chat, budget pinned to each cap;
- naive: the job beside chat, budget unlimited (offline at low priority only).

One batch job stays backlogged from offline-only to the end (a fresh one replaces it should it
run out); between policies only the budget changes, and each run starts after `settle_s`.
Budgets are pinned with the controller's override, which the engines enforce at every step.
Offline and online token rates come from the engines' own counters; latencies from the clients.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.stats import percentile, wilson_interval

UNLIMITED_BUDGET = {"max_offline_seqs": [100000], "max_offline_tokens": [100000]}


@dataclass
class BenchOptions:
    rate_per_s: float = 0.8
    """At 1.0 the online-only run kept the engine 48-64% busy on 2 cores (the aim is 30-60%)."""
    duration_s: float = 380.0
    """304 chat requests at 0.8/s: 100 cannot tell 98% from 99% attainment (Wilson 95% interval
    at 99/100: 0.95-1.00); at 300 a 99% run's lower bound is about 0.97."""
    offline_only_s: float = 45.0
    """The throughput ceiling needs no chat trace, only a steady backlog."""
    static_caps: tuple[int, ...] = (1, 2, 4)
    """Static caps of 8 and more missed the SLO by far in every full run (20-56% attainment)."""
    sweep_batches: tuple[int, ...] = (2, 4, 8, 16, 32)
    sweep_s: float = 10.0
    settle_s: float = 10.0
    repeats: int = 1
    slo_tolerance: float | None = 0.5
    """None: the SLO comes from the SLO file."""
    online_trace: Path | None = None
    offline_trace: Path | None = None
    num_offline_requests: int = 4000
    job_concurrency: int = 64
    full_lengths: bool = False
    """Trace lengths as recorded (`length_limits`), for a model with a GPU-sized context (the
    emulated engine's); the default scales them to the bench model's."""


def length_limits(max_len: int, full_lengths: bool, kind: str) -> dict[str, Any]:
    """How a trace's lengths fit an engine of `max_len` context (`kind`: "chat" or "offline"):
    the bench's scaling to a small model's context (the traces' prompts average ~1,100 tokens,
    arXiv's ~8,000), or, `full_lengths`, as recorded, capped to the context (output at a quarter
    of it, the prompt at the rest). The bench and the simulator build their workloads with it."""
    if full_lengths:
        return {"length_scale": 1.0, "max_prompt_tokens": max_len * 3 // 4, "max_output_tokens": max_len // 4}
    if kind == "chat":
        return {"length_scale": max_len / 8192, "max_prompt_tokens": max_len // 4, "max_output_tokens": max_len // 8}
    return {"length_scale": max_len / 16384, "max_prompt_tokens": max_len // 2, "max_output_tokens": max_len // 8}


def quick_options(**kw) -> BenchOptions:
    # Measured 4.3 min on 2 cores, 70-120 s of stack start-up included.
    return BenchOptions(duration_s=15.0, offline_only_s=15.0, static_caps=(2, 8), sweep_batches=(2, 8),
                        sweep_s=5.0, settle_s=3.0, **kw)


@dataclass
class Sampler:
    """Polls the controller for per-replica engine counters: time series of online load and of
    admitted offline tokens/s."""

    controller: Any
    period_s: float = 0.5
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        import ray

        while not stop.is_set():
            status = await asyncio.to_thread(ray.get, self.controller.status.remote())
            now = time.monotonic()
            for r in status["replicas"]:
                self.samples.append({"t": now, **{k: r.get(k) for k in (
                    "replica_id", "online_requests", "offline_running", "offline_waiting", "offline_budget_seqs",
                    "throttle", "num_offline_tokens_total", "num_online_tokens_total", "step_time_s_total",
                    "num_offline_output_tokens_total", "num_offline_prompt_tokens_total", "headroom", "probe_tpot",
                    "num_offline_preempted_total", "throttle_reactions", "throttle_scale", "pressure",
                    "observed_ttft_p99_ms", "observed_tpot_p99_ms", "predicted_step_ms", "model_calibration")}})
            await asyncio.sleep(self.period_s)


def counter_delta(samples: list[dict[str, Any]], key: str, t0: float, t1: float) -> float:
    """Sum over replicas of a cumulative counter's increase within [t0, t1]."""
    total = 0.0
    for rid in {s["replica_id"] for s in samples}:
        rows = [s for s in samples if s["replica_id"] == rid and t0 <= s["t"] <= t1 and s.get(key) is not None]
        if len(rows) >= 2:
            total += rows[-1][key] - rows[0][key]
    return total


def met_flags(row: dict[str, Any], slo: dict[str, float]) -> list[bool]:
    """Per online request of a run's row: did it succeed and meet both targets."""
    return [bool(ok and ttft is not None and ttft <= slo["ttft_p99_ms"] and (tpot is None or tpot <= slo["tpot_p99_ms"]))
            for ttft, tpot, ok in row.get("requests") or []]


def attainment(row: dict[str, Any], slo: dict[str, float]) -> float | None:
    """Share of online requests that succeeded and met both targets."""
    met = met_flags(row, slo)
    return float(np.mean(met)) if met else None


def chat_metrics(results, slo: dict[str, float] | None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft_s * 1000 for r in ok if r.ttft_s is not None])
    tpot = np.array([r.tpot_s * 1000 for r in ok if r.tpot_s is not None])

    def pct(a, q):
        return percentile(a, q)

    out = {"num_online": len(results), "num_online_failed": len(results) - len(ok),
           "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
           "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
           "ttft_ms": ttft.tolist(), "tpot_ms": tpot.tolist(),
           "requests": [(None if r.ttft_s is None else r.ttft_s * 1000, None if r.tpot_s is None else r.tpot_s * 1000,
                         r.ok) for r in results]}
    if slo is not None:
        out["slo_attainment"] = attainment(out, slo)
    return out


DRY_RERUN_S = 3.0
"""A run whose engines held no offline request for this long is re-run (a budget of 0 beside
chat still holds the job's requests, paused or waiting: zero held means the job had none left)."""


def backlog_dry_s(samples: list[dict[str, Any]], t0: float, t1: float) -> float:
    """Seconds in [t0, t1] during which no engine held any offline request."""
    times = sorted({s["t"] for s in samples if t0 <= s["t"] <= t1})
    dry = 0.0
    for a, b in zip(times, times[1:]):
        held = sum((s.get("offline_running") or 0) + (s.get("offline_waiting") or 0)
                   for s in samples if s["t"] == a)
        if held == 0:
            dry += b - a
    return dry


def reaction_times_ms(samples: list[dict[str, Any]], t0: float, wall0: float, duration_s: float) -> list[float]:
    """Engine throttle reactions (ms from a chat burst to less offline work) during the window."""
    seen: dict[tuple[str, float], float] = {}
    for s in samples:
        for started, ms in s.get("throttle_reactions") or []:
            if wall0 <= started <= wall0 + duration_s:
                seen[(s["replica_id"], started)] = ms
    return sorted(seen.values())


class Bench:
    def __init__(self, config, state, controller, opts: BenchOptions, out_dir: Path,
                 on_progress: Callable[[str], None]) -> None:
        self.config, self.state, self.controller, self.opts = config, state, controller, opts
        self.out_dir = out_dir
        self.on_progress = on_progress
        self.max_len = int(config.replicas.engine_kwargs.get("max_model_len", 1024))
        self.slo: dict[str, float] | None = None
        self.started = time.monotonic()
        self.job_id: str | None = None
        self.num_jobs = 0
        self.num_runs = 0

    def log(self, msg: str) -> None:
        self.on_progress(f"[bench {time.monotonic() - self.started:5.0f}s] {msg}")

    def online_specs(self):
        from profiler.workload import AZURE_CONV, load_chat_trace

        return load_chat_trace(self.opts.online_trace or AZURE_CONV, rate_per_s=self.opts.rate_per_s,
                               duration_s=self.opts.duration_s,
                               **length_limits(self.max_len, self.opts.full_lengths, "chat"))

    def _override(self, budget) -> None:
        import ray

        ray.get(self.controller.set_override.remote(budget))

    def _submit_job(self, tag: str) -> str:
        from ray.job_submission import JobSubmissionClient

        from profiler.workload import write_batch_input

        specs = self.offline_specs(seed=self.num_jobs)
        inp = write_batch_input(specs, self.out_dir / "jobs" / f"{tag}-input.jsonl", self.config.model.id, prefix=tag)
        out = self.out_dir / "jobs" / f"{tag}-output.jsonl"
        client = JobSubmissionClient(self.state.dashboard_url)
        job_id = f"bench-{tag}-{int(time.time())}"
        root = Path(__file__).resolve().parents[1]
        client.submit_job(
            submission_id=job_id,
            entrypoint=(f"python -m jobs.batch --input {inp.resolve()} --output {out.resolve()} "
                        f"--endpoint {self.state.endpoint} --concurrency {self.opts.job_concurrency}"),
            runtime_env={"working_dir": str(root), "excludes": [".venv", ".git", "results", ".colocate", "*.parquet"]})
        return job_id

    def ensure_backlog(self) -> None:
        """One batch job feeds every offline policy in turn; only the budget changes between them.
        A job per policy cost ~15 s each to start and stop on 2 cores, and its ramp fell inside
        the measurement. A job that ran out of work is replaced by a fresh one."""
        import ray
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.state.dashboard_url)
        if self.job_id and client.get_job_status(self.job_id) in (JobStatus.PENDING, JobStatus.RUNNING):
            return
        if self.job_id:
            self.log(f"batch job {self.job_id} ended ({client.get_job_status(self.job_id)}); submitting another")
        self.num_jobs += 1
        self.job_id = self._submit_job(f"backlog-{self.num_jobs}")
        # Wait for its requests to reach the engines, so the policy's settle time is not spent on
        # the job driver's start-up.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.get_job_status(self.job_id) in (JobStatus.PENDING,
                                                                                       JobStatus.RUNNING):
            replicas = ray.get(self.controller.status.remote())["replicas"]
            if sum(r.get("offline_running") or 0 for r in replicas) > 0:
                break
            time.sleep(0.5)
        self.log(f"batch job {self.job_id}: {client.get_job_status(self.job_id)}")

    def stop_backlog(self) -> None:
        from ray.job_submission import JobSubmissionClient

        if self.job_id is None:
            return
        try:
            JobSubmissionClient(self.state.dashboard_url).stop_job(self.job_id)
        except Exception as err:  # noqa: BLE001 - a job that already ended is fine
            self.log(f"stopping {self.job_id}: {err}")
        self.job_id = None

    def run_policy(self, name: str, budget, *, online: bool, offline: bool) -> dict[str, Any]:
        """One side-by-side run: the same online replay and/or offline job under one budget."""
        from profiler.workload import run_chat_load

        duration_s = self.opts.duration_s if online else self.opts.offline_only_s
        self._override(budget)
        self.num_runs += 1
        # Same arrivals and lengths in every run, but fresh prompt text: a replay of the previous
        # run's prompts is served from vLLM's prefix cache (chat prefills almost free), which
        # flattered every policy run after the online-only reference.
        prompt_tag = f"bench-run{self.num_runs}"
        if offline:
            self.ensure_backlog()
        self.log(f"{name}: {'chat' if online else ''}{' + ' if online and offline else ''}"
                 f"{'batch job' if offline else ''}, {duration_s:.0f} s")

        async def go():
            sampler = Sampler(self.controller)
            stop = asyncio.Event()
            task = asyncio.create_task(sampler.run(stop))
            if offline:
                await asyncio.sleep(self.opts.settle_s)
            t0, wall0 = time.monotonic(), time.time()
            results = (await run_chat_load(self.state.endpoint, self.config.model.id, self.online_specs(),
                                           prompt_tag=prompt_tag)
                       if online else await asyncio.sleep(duration_s) or [])
            t1 = time.monotonic()
            await asyncio.sleep(0.6)
            stop.set()
            await task
            return results, sampler.samples, t0, t1, wall0

        results, samples, t0, t1, wall0 = asyncio.run(go())
        elapsed = t1 - t0
        # Offline throughput is output (decode) tokens: the prompts of arXiv-length requests are
        # most of the tokens an engine processes and would flatter any policy that admits them.
        offline_tps = counter_delta(samples, "num_offline_output_tokens_total", t0, t1) / elapsed
        offline_prompt_tps = counter_delta(samples, "num_offline_prompt_tokens_total", t0, t1) / elapsed
        online_tps = counter_delta(samples, "num_online_tokens_total", t0, t1) / elapsed
        row = {
            "policy": name, "budget": budget, "elapsed_s": elapsed,
            **(chat_metrics(results, self.slo) if online else {}),
            "offline_tokens_per_s": offline_tps, "offline_prompt_tokens_per_s": offline_prompt_tps,
            "online_tokens_per_s": online_tps, "total_tokens_per_s": offline_tps + online_tps,
            "backlog_dry_s": backlog_dry_s(samples, t0, t1) if offline else 0.0,
            "engine_busy_fraction": counter_delta(samples, "step_time_s_total", t0, t1) / elapsed,
            "offline_preempted": counter_delta(samples, "num_offline_preempted_total", t0, t1),
            "throttle_reaction_ms": reaction_times_ms(samples, t0, wall0, elapsed),
            "timeseries": [{k: s[k] for k in ("t", "online_requests", "offline_running", "num_offline_tokens_total", "offline_budget_seqs",
                                              "throttle", "throttle_scale", "pressure", "observed_ttft_p99_ms",
                                              "observed_tpot_p99_ms", "predicted_step_ms", "model_calibration")}
                           | {"t": s["t"] - t0} for s in samples],
        }
        self.log(f"{name}: " + ", ".join(f"{k} {row[k]:.3g}" for k in (
            "ttft_p99_ms", "tpot_p99_ms", "slo_attainment", "offline_tokens_per_s", "offline_prompt_tokens_per_s",
            "engine_busy_fraction", "backlog_dry_s") if row.get(k) is not None))
        return row

    def run_policy_with_backlog(self, name: str, budget, *, online: bool) -> dict[str, Any]:
        """`run_policy` with the offline backlog; a run whose backlog ran dry (no offline request
        held by any engine for a while) measured an idle engine, not the policy: it is flagged
        and run once more on a fresh job."""
        row = self.run_policy(name, budget, online=online, offline=True)
        if row["backlog_dry_s"] >= DRY_RERUN_S:
            self.log(f"{name}: the backlog ran dry for {row['backlog_dry_s']:.0f} s; running it again")
            self.stop_backlog()
            again = self.run_policy(name, budget, online=online, offline=True)
            again["rerun_after_dry_backlog"] = row["backlog_dry_s"]
            row = again
        return row

    def offline_specs(self, seed: int):
        from profiler.workload import ARXIV_LENGTHS, load_offline_lengths

        return load_offline_lengths(self.opts.offline_trace or ARXIV_LENGTHS,
                                    num_requests=self.opts.num_offline_requests, seed=seed,
                                    **length_limits(self.max_len, self.opts.full_lengths, "offline"))

    def batch_sweep(self) -> list[dict[str, Any]]:
        """Offline streams alone at steady batch sizes, with the batch job's own length
        distribution (the same workload as every co-located run): TPOT p99 and output tokens/s
        per batch. The largest batch meeting the TPOT SLO is the SLO-bounded ceiling."""
        from profiler.workload import offline_stream_backlog

        lengths = self.offline_specs(seed=10_000)

        rows = []
        for b in self.opts.sweep_batches:
            self._override({"max_offline_seqs": [b], "max_offline_tokens": [b + 64]})

            async def go(b=b):
                sampler = Sampler(self.controller)
                stop, stop_sampler = asyncio.Event(), asyncio.Event()
                tpots: list[float] = []
                backlog = asyncio.create_task(offline_stream_backlog(
                    self.state.endpoint, self.config.model.id, b, 64, 32, stop, prompt_tag=f"sweep-b{b}",
                    tpots_ms=tpots, lengths=lengths))
                task = asyncio.create_task(sampler.run(stop_sampler))
                await asyncio.sleep(min(4.0, self.opts.sweep_s / 2))
                t0 = time.monotonic()
                tpots.clear()
                await asyncio.sleep(self.opts.sweep_s)
                t1 = time.monotonic()
                measured = list(tpots)
                stop.set()
                stop_sampler.set()
                await asyncio.gather(backlog, task)
                return measured, counter_delta(sampler.samples, "num_offline_output_tokens_total", t0, t1) / (t1 - t0)

            tpots, tps = asyncio.run(go())
            row = {"batch": b, "tpot_p50_ms": float(np.percentile(tpots, 50)) if tpots else None,
                   "tpot_p99_ms": float(np.percentile(tpots, 99)) if tpots else None,
                   "offline_tokens_per_s": tps, "num_requests": len(tpots)}
            self.log(f"sweep batch {b}: TPOT p99 {row['tpot_p99_ms'] or float('nan'):.0f} ms, {tps:.1f} tok/s")
            rows.append(row)
        return rows


def _median_spread(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict[str, Any]]], sweep: list[dict[str, Any]], slo: dict[str, float]) -> dict[str, Any]:
    """Medians (and spread) per policy, and the headline ratios."""
    table = {}
    for name, rows in runs.items():
        table[name] = {k: _median_spread(rows, k) for k in (
            "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "slo_attainment",
            "offline_tokens_per_s", "offline_prompt_tokens_per_s", "total_tokens_per_s", "engine_busy_fraction",
            "offline_preempted")}
        table[name]["num_runs"] = len(rows)
        met = [m for r in rows for m in met_flags(r, slo)]
        if met:
            table[name]["slo_attainment_ci95"] = list(wilson_interval(sum(met), len(met)))
            table[name]["num_online_requests"] = len(met)
        reactions = [ms for r in rows for ms in r.get("throttle_reaction_ms", [])]
        table[name]["throttle_reaction_ms"] = {"median": statistics.median(reactions) if reactions else None,
                                               "max": max(reactions) if reactions else None, "count": len(reactions)}

    rows_of = runs

    def med(name, key):
        return (table.get(name) or {}).get(key, {}).get("median")

    ceiling = med("offline-only", "offline_tokens_per_s") or 0.0
    fitting = [r for r in sweep if r["tpot_p99_ms"] is not None and r["tpot_p99_ms"] <= slo["tpot_p99_ms"]]
    bound_row = max(fitting, key=lambda r: r["batch"]) if fitting else None
    bound = bound_row["offline_tokens_per_s"] if bound_row else None
    for name in table:
        # Offline output tokens/s as a share of what offline-only ran on the same workload
        # (HyGen's "offline throughput as a share of offline-only"), and of the SLO-bounded
        # ceiling (the largest steady batch of the same workload meeting the TPOT SLO).
        off = med(name, "offline_tokens_per_s")
        table[name]["utilization_vs_offline_only"] = off / ceiling if off is not None and ceiling else None
        table[name]["slo_bounded_utilization"] = off / bound if off is not None and bound else None
        table[name]["backlog_dry_s"] = max((r.get("backlog_dry_s") or 0.0 for r in rows_of[name]), default=0.0)
    statics = [n for n in table if n.startswith("static-")
               and (med(n, "slo_attainment") or 0) >= 0.99]
    best_static = max(statics, key=lambda n: med(n, "offline_tokens_per_s") or 0) if statics else None
    colocate_off = med("colocate", "offline_tokens_per_s")
    return {
        "slo": slo,
        "policies": table,
        "sweep": sweep,
        "slo_bounded_batch": bound_row["batch"] if bound_row else None,
        "slo_bounded_tokens_per_s": bound,
        "offline_only_tokens_per_s": ceiling,
        "best_static_meeting_slo": best_static,
        "colocate_vs_best_static_offline": (colocate_off / med(best_static, "offline_tokens_per_s")
                                            if best_static and colocate_off is not None
                                            and med(best_static, "offline_tokens_per_s") else None),
        "checks": {
            "colocate_attainment_ge_0.99": (med("colocate", "slo_attainment") or 0) >= 0.99,
            "naive_attainment_lt_0.99": (med("naive", "slo_attainment") or 0) < 0.99,
            "colocate_ge_1.5x_best_static": None if not best_static or colocate_off is None else
            colocate_off >= 1.5 * (med(best_static, "offline_tokens_per_s") or 0),
            "colocate_wilson_lower_ge_0.97": None if not table.get("colocate", {}).get("slo_attainment_ci95")
            else table["colocate"]["slo_attainment_ci95"][0] >= 0.97,
            "colocate_ge_1.0x_best_static": None if not best_static or colocate_off is None else
            colocate_off >= (med(best_static, "offline_tokens_per_s") or 0),
            # The emulated GPU engine's bars (a throughput curve that grows with batch size).
            "colocate_ge_2x_best_static": None if not best_static or colocate_off is None else
            colocate_off >= 2.0 * (med(best_static, "offline_tokens_per_s") or 0),
            "colocate_ge_0.8_offline_only": None if not ceiling or colocate_off is None else
            colocate_off >= 0.8 * ceiling,
            "no_dry_backlog": all((m.get("backlog_dry_s") or 0.0) < DRY_RERUN_S for m in table.values()),
        },
    }


def engine_label(config) -> str:
    """What ran the steps: `real`, or the emulated GPU it stands for (results are labelled so)."""
    if config.replicas.engine != "emulated":
        return "real"
    emu = config.replicas.emulation
    return f"emulated {emu.model_shape} on {emu.gpu} (roofline model)"


def plot(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, target in [(axes[0], "ttft_ms", summary["slo"]["ttft_p99_ms"]),
                            (axes[1], "tpot_ms", summary["slo"]["tpot_p99_ms"])]:
        for name, rows in runs.items():
            values = np.sort(np.concatenate([np.asarray(r.get(key, [])) for r in rows]) if rows else [])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name,
                        linewidth=2.5 if name == "colocate" else 1.3)
        ax.axvline(target, color="red", linestyle="--", label=f"SLO p99 {target:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel(key.replace("_ms", " (ms, log)").upper())
        ax.set_ylabel("share of online requests")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Online latency CDFs per policy (same trace, same engine: {summary.get('engine', 'real')})")
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    shown = [n for n in ("naive", "colocate") + tuple(n for n in runs if n.startswith("static-")) if n in runs][:4]
    if not shown:  # no co-located run (only references): nothing to set side by side
        return paths
    fig, axes = plt.subplots(len(shown), 1, figsize=(12, 2.6 * len(shown)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], shown):
        ts = runs[name][0]["timeseries"]
        t = np.array([s["t"] for s in ts])
        tokens = np.array([s["num_offline_tokens_total"] or 0 for s in ts], dtype=float)
        online = np.array([s["online_requests"] or 0 for s in ts], dtype=float)
        rate = np.diff(tokens) / np.maximum(np.diff(t), 1e-3) if len(t) > 1 else np.array([])
        ax.plot(t[1:], rate, color="tab:blue", label="admitted offline tokens/s")
        ax.set_ylabel("offline tok/s", color="tab:blue")
        ax2 = ax.twinx()
        ax2.step(t, online, color="tab:orange", where="post", label="online requests in engine")
        ax2.set_ylabel("online reqs", color="tab:orange")
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds into the run")
    fig.suptitle(f"Online load against admitted offline throughput ({summary.get('engine', 'real')} engine)")
    fig.tight_layout()
    paths.append(out_dir / "timeseries.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def format_table(summary: dict[str, Any]) -> str:
    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"SLO: TTFT p99 <= {summary['slo']['ttft_p99_ms']:.0f} ms, TPOT p99 <= {summary['slo']['tpot_p99_ms']:.0f} ms "
             f"({summary['slo'].get('source', '')})",
             f"{'policy':<14} {'TTFT p50/p99':>14} {'TPOT p50/p99':>13} {'attain':>7} {'Wilson lo':>9} "
             f"{'off out/s':>9} {'off prompt/s':>12} {'util/off':>8} {'util/SLO':>8} {'preempt':>7} {'react ms':>8}"]
    for name, m in summary["policies"].items():
        lines.append(
            f"{name:<14} {f(m['ttft_p50_ms']['median']):>6}/{f(m['ttft_p99_ms']['median']):<7} "
            f"{f(m['tpot_p50_ms']['median']):>6}/{f(m['tpot_p99_ms']['median']):<6} "
            f"{f(m['slo_attainment']['median'], '{:.3f}'):>7} "
            f"{f((m.get('slo_attainment_ci95') or [None])[0], '{:.3f}'):>9} "
            f"{f(m['offline_tokens_per_s']['median'], '{:.1f}'):>9} "
            f"{f(m['offline_prompt_tokens_per_s']['median'], '{:.1f}'):>12} {f(m['utilization_vs_offline_only'], '{:.2f}'):>8} "
            f"{f(m['slo_bounded_utilization'], '{:.2f}'):>8} {f(m['offline_preempted']['median']):>7} "
            f"{f(m['throttle_reaction_ms']['median']):>8}")
    for name, m in summary["policies"].items():
        if m.get("num_runs", 1) > 1:
            def span(key, fmt="{:.0f}", m=m):
                return f"{f(m[key]['min'], fmt)}-{f(m[key]['max'], fmt)}"
            lines.append(f"  {name} over {m['num_runs']} runs (min-max): attain {span('slo_attainment', '{:.3f}')}, "
                         f"off tok/s {span('offline_tokens_per_s')}, TTFT p99 {span('ttft_p99_ms')}, "
                         f"TPOT p99 {span('tpot_p99_ms')}")
    intervals = [f"{name} {m['slo_attainment_ci95'][0]:.3f}-{m['slo_attainment_ci95'][1]:.3f}"
                 for name, m in summary["policies"].items() if m.get("slo_attainment_ci95")]
    if intervals:
        counts = sorted({m["num_online_requests"] for m in summary["policies"].values() if m.get("num_online_requests")})
        lines.append(f"attainment 95% interval (Wilson, {'/'.join(map(str, counts))} requests): " + ", ".join(intervals))
    lines.append(f"SLO-bounded batch {summary['slo_bounded_batch']} ({f(summary['slo_bounded_tokens_per_s'], '{:.1f}')} tok/s); "
                 f"offline-only {summary['offline_only_tokens_per_s']:.1f} tok/s; best static meeting 99%: "
                 f"{summary['best_static_meeting_slo']}; colocate / best static offline: "
                 f"{f(summary['colocate_vs_best_static_offline'], '{:.2f}')}")
    dry = [f"{n} {m['backlog_dry_s']:.0f} s" for n, m in summary["policies"].items() if (m.get("backlog_dry_s") or 0) > 0]
    if dry:
        lines.append("WARNING: the offline backlog ran dry during: " + ", ".join(dry))
    lines.append("offline tok/s are output (decode) tokens; prompt tokens beside them")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in summary["checks"].items()))
    return "\n".join(lines)


def run_bench(config, opts: BenchOptions, out_dir: Path, on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring a stack up (its own), run every policy, write results.json and the plots."""
    import ray

    from latency_model.model import train
    from latency_model.schema import read_steps
    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.control.controller import get_controller
    from orchestrator.control.slo import load_slo

    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    controller_cfg = config.controller
    if controller_cfg.model_path is None:
        on_progress("[bench] training the step-latency model on the committed CPU profile")
        model, _ = train(read_steps(root / "profiler" / "data" / "cpu-bench-profile.parquet"))
        model.save(out_dir / "latency-model")
        controller_cfg = controller_cfg.model_copy(update={"model_path": str((out_dir / "latency-model").resolve())})
    slo_file = out_dir / "slo.yaml"
    slo_file.write_text(Path(controller_cfg.slo_path).read_text())
    controller_cfg = controller_cfg.model_copy(update={"slo_path": str(slo_file.resolve()), "enabled": True})
    config = config.model_copy(update={"controller": controller_cfg})
    if cluster.StackState.load() is not None:
        raise cluster.StackError("a stack is already up; `colocate bench` brings up its own (run `colocate down`)")
    state = cluster.bring_up(config, on_progress=on_progress)
    bench = None
    try:
        cluster.connect(state.address)
        bench = Bench(config, state, get_controller(), opts, out_dir, on_progress)
        runs: dict[str, list[dict[str, Any]]] = {}
        runs["online-only"] = [bench.run_policy("online-only", {"max_offline_seqs": [0], "max_offline_tokens": [0]},
                                                online=True, offline=False) for _ in range(opts.repeats)]
        if opts.slo_tolerance is None:
            targets = load_slo(slo_file, {config.model.id}).models[config.model.id]
            slo = {"ttft_p99_ms": targets.ttft_p99_ms, "tpot_p99_ms": targets.tpot_p99_ms, "source": str(slo_file)}
        else:
            ref = [r for r in runs["online-only"]]
            slo = {"ttft_p99_ms": statistics.median(r["ttft_p99_ms"] for r in ref) * (1 + opts.slo_tolerance),
                   "tpot_p99_ms": statistics.median(r["tpot_p99_ms"] for r in ref) * (1 + opts.slo_tolerance),
                   "source": f"online-only p99 x {1 + opts.slo_tolerance:g}"}
            text = slo_file.read_text()
            import yaml

            doc = yaml.safe_load(text)
            doc["models"][config.model.id].update(ttft_p99_ms=round(slo["ttft_p99_ms"], 1),
                                                  tpot_p99_ms=round(slo["tpot_p99_ms"], 1))
            slo_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        bench.slo = slo
        on_progress(f"[bench] SLO: TTFT p99 <= {slo['ttft_p99_ms']:.0f} ms, TPOT p99 <= {slo['tpot_p99_ms']:.0f} ms "
                    f"({slo['source']})")
        for r in runs["online-only"]:
            r["slo_attainment"] = attainment(r, slo)
        # The sweep's own streams come before the batch job starts: the job runs from here on.
        sweep = bench.batch_sweep()
        runs["offline-only"] = [bench.run_policy_with_backlog("offline-only", UNLIMITED_BUDGET, online=False)]
        # Colocate goes first after offline-only: the controller keeps observing under a pinned
        # budget, and after a static cap or naive run that broke the SLO it would start from the
        # throttle state that run left (in the quick bench, the minimum scale).
        for _ in range(opts.repeats):
            runs.setdefault("colocate", []).append(bench.run_policy_with_backlog("colocate", None, online=True))
        for cap in opts.static_caps:
            runs[f"static-{cap}"] = [bench.run_policy_with_backlog(
                f"static-{cap}", {"max_offline_seqs": [cap], "max_offline_tokens": [cap + 64]}, online=True)]
        for _ in range(opts.repeats):
            runs.setdefault("naive", []).append(bench.run_policy_with_backlog("naive", UNLIMITED_BUDGET, online=True))
        runs = {**{k: v for k, v in runs.items() if k != "colocate"}, "colocate": runs["colocate"]}  # table order
        summary = summarize(runs, sweep, slo)
        summary["online_load"] = {"rate_per_s": opts.rate_per_s, "duration_s": opts.duration_s,
                                  "trace": str(opts.online_trace or "azure_llm_2023_conv.csv"),
                                  "online_only_engine_busy": summary["policies"]["online-only"]["engine_busy_fraction"]}
        summary["model"] = config.model.id
        summary["engine"] = engine_label(config)
        summary["options"] = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                              for k, v in opts.__dict__.items()}
        (out_dir / "results.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=str) + "\n")
        summary["plots"] = [str(p) for p in plot(runs, summary, out_dir)]
        return summary
    finally:
        if bench is not None:
            bench.stop_backlog()
        try:
            ray.get(get_controller().set_override.remote(None), timeout=10)
        except Exception:  # noqa: BLE001 - the stack is going away anyway
            pass
        # Leave the cluster before stopping it: a driver left connected waits on the dead GCS.
        ray.shutdown()
        cluster.teardown(state)
