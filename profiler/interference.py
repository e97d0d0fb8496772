"""SLO-aware interference profiler: how much offline work can share a replica with a given chat
load before the chat SLO breaks, and what per-step latency budget that means.

Against a running stack (`colocate up`, controller on): for a candidate offline load, fixed as a
static budget of `s` offline sequences per replica (`Controller.set_override`, enforced in the
engines at every step), it replays the online load (a rate, or the Azure trace with its
inter-arrival times scaled to that rate) beside a standing offline backlog and measures, at the
clients, online p99 TTFT and TPOT, and at the replicas the p99 latency of steps that held online
requests. The search probes s = 0, 1, 2, 4, ... until the SLO breaks and then bisects: the
largest s that holds gives the **per-step latency budget** (the p99 step latency observed there)
and the offline load that goes with it. Written as a profile file the controller reads
(`controller.profile_path`) and a PNG of online p99 TTFT and TPOT against offline load with the
SLO lines drawn.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.control.profile import PROFILE_KIND, PROFILE_VERSION


@dataclass(frozen=True)
class LoadPoint:
    offline_seqs: int
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None
    step_p99_ms: float | None
    offline_tokens_per_s: float
    num_online: int
    num_online_failed: int

    def meets(self, ttft_p99_ms: float, tpot_p99_ms: float) -> bool:
        return (self.num_online_failed == 0 and self.ttft_p99_ms is not None and self.tpot_p99_ms is not None
                and self.ttft_p99_ms <= ttft_p99_ms and self.tpot_p99_ms <= tpot_p99_ms)


def search_largest(measure: Callable[[int], LoadPoint], ok: Callable[[LoadPoint], bool],
                   max_seqs: int) -> tuple[LoadPoint | None, list[LoadPoint]]:
    """Largest offline load whose point is `ok`: doubling probes, then bisection. Assumes more
    offline work never makes chat faster; returns (best or None, every point measured)."""
    points: dict[int, LoadPoint] = {}

    def at(s: int) -> LoadPoint:
        if s not in points:
            points[s] = measure(s)
        return points[s]

    if not ok(at(0)):
        return None, list(points.values())
    good, bad = 0, None
    s = 1
    while s <= max_seqs:
        if ok(at(s)):
            good = s
            s *= 2
        else:
            bad = s
            break
    if bad is None:
        if good < max_seqs and ok(at(max_seqs)):
            good = max_seqs
        elif good < max_seqs:
            bad = max_seqs
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if ok(at(mid)):
            good = mid
        else:
            bad = mid
    return points[good], sorted(points.values(), key=lambda p: p.offline_seqs)


def profile_document(best: LoadPoint | None, points: list[LoadPoint], *, model: str, slo: dict[str, float],
                     online_load: dict[str, Any]) -> dict[str, Any]:
    if best is None:
        step_budget = None
    else:
        step_budget = best.step_p99_ms
    return {
        "kind": PROFILE_KIND, "version": PROFILE_VERSION, "model": model, "slo": slo,
        "online_load": online_load,
        "step_budget_ms": step_budget,
        "offline_seqs": best.offline_seqs if best else 0,
        "offline_tokens_per_s": best.offline_tokens_per_s if best else 0.0,
        "slo_holds_without_offline": best is not None,
        "points": [asdict(p) for p in points],
        "created_at_s": time.time(),
    }


def plot_profile(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["points"]
    x = [p["offline_tokens_per_s"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, target, label in [
        (axes[0], "ttft_p99_ms", doc["slo"]["ttft_p99_ms"], "online p99 TTFT (ms)"),
        (axes[1], "tpot_p99_ms", doc["slo"]["tpot_p99_ms"], "online p99 TPOT (ms)"),
    ]:
        y = [p[key] if p[key] is not None else float("nan") for p in points]
        colors = ["tab:green" if p["ttft_p99_ms"] is not None and p["tpot_p99_ms"] is not None
                  and p["ttft_p99_ms"] <= doc["slo"]["ttft_p99_ms"] and p["tpot_p99_ms"] <= doc["slo"]["tpot_p99_ms"]
                  else "tab:red" for p in points]
        ax.plot(x, y, color="0.6", zorder=1)
        ax.scatter(x, y, c=colors, zorder=2)
        for xi, yi, p in zip(x, y, points):
            ax.annotate(f"{p['offline_seqs']} seq", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(target, color="tab:red", linestyle="--", label=f"SLO {target:.0f} ms")
        ax.set_xlabel("offline throughput (tokens/s)")
        ax.set_ylabel(label)
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    best = doc.get("offline_seqs")
    budget = doc.get("step_budget_ms")
    fig.suptitle(f"{doc['model']}: online load {doc['online_load'].get('rate_per_s')} req/s; "
                 f"largest safe offline load {best} seq/replica, per-step budget "
                 f"{'-' if budget is None else f'{budget:.0f} ms'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the live measurement ---------------------------------------------------------------------


def measure_point(*, controller, endpoint: str, model: str, specs, offline_seqs: int, backlog: int,
                  offline_prompt_tokens: int, offline_output_tokens: int, chunk_tokens: int,
                  settle_s: float = 3.0) -> LoadPoint:
    """Online replay beside an offline backlog under a static budget of `offline_seqs`. Each
    point's prompts are its own (tagged by `offline_seqs`): a replay of the previous point's
    prompts would be served from vLLM's prefix cache."""
    import ray

    from profiler.workload import offline_stream_backlog, run_chat_load, summarize_chat

    ray.get(controller.set_override.remote({"max_offline_seqs": [offline_seqs],
                                            "max_offline_tokens": [offline_seqs * (1 + chunk_tokens)]}))
    step_samples: list[float] = []

    async def run() -> tuple[list, int, float]:
        stop = asyncio.Event()
        backlog_task = asyncio.create_task(offline_stream_backlog(
            endpoint, model, backlog if offline_seqs > 0 else 0, offline_prompt_tokens, offline_output_tokens, stop,
            prompt_tag=f"interference-backlog-{offline_seqs}"))
        await asyncio.sleep(settle_s if offline_seqs > 0 else 0.0)

        async def sample_steps() -> None:
            while not stop.is_set():
                status = await asyncio.to_thread(ray.get, controller.status.remote())
                step_samples.extend(r["step_p99_ms"] for r in status["replicas"] if r.get("step_p99_ms"))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_steps())
        before = time.monotonic()
        results = await run_chat_load(endpoint, model, specs, prompt_tag=f"interference-chat-{offline_seqs}")
        elapsed = time.monotonic() - before
        stop.set()
        tokens = await backlog_task
        await sampler
        return results, tokens, elapsed + (settle_s if offline_seqs > 0 else 0.0)

    results, tokens, elapsed = asyncio.run(run())
    summary = summarize_chat(results)
    return LoadPoint(
        offline_seqs=offline_seqs, ttft_p99_ms=summary["ttft_p99_ms"], tpot_p99_ms=summary["tpot_p99_ms"],
        step_p99_ms=statistics.median(step_samples) if step_samples else None,
        offline_tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        num_online=summary["num_requests"], num_online_failed=summary["num_requests"] - summary["num_ok"])


def run_interference(config, *, ttft_p99_ms: float, tpot_p99_ms: float, rate_per_s: float, duration_s: float,
                     trace: Path | None, max_seqs: int, out: Path, plot: Path,
                     on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    import ray

    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.control.controller import get_controller
    from profiler.workload import AZURE_CONV, load_chat_trace

    state = cluster.StackState.load()
    if state is None:
        raise RuntimeError("no stack is up: run `colocate up` (with the controller enabled) first")
    cluster.connect(state.address)
    try:
        controller = get_controller()
    except ValueError:
        raise RuntimeError("the stack has no controller (controller.enabled: false)") from None
    max_len = int(config.replicas.engine_kwargs.get("max_model_len", 2048))
    specs = load_chat_trace(trace or AZURE_CONV, rate_per_s=rate_per_s, duration_s=duration_s,
                            length_scale=max_len / 8192, max_prompt_tokens=max_len // 2,
                            max_output_tokens=max_len // 4)
    chunk = int(config.replicas.engine_kwargs.get("max_num_batched_tokens", 512)) // 8
    started = time.monotonic()

    def measure(s: int) -> LoadPoint:
        on_progress(f"interference: measuring {s} offline seq/replica ({duration_s:.0f} s of chat at "
                    f"{rate_per_s} req/s; {time.monotonic() - started:.0f} s so far)")
        point = measure_point(controller=controller, endpoint=state.endpoint, model=config.model.id, specs=specs,
                              offline_seqs=s, backlog=max(2 * s, 4), offline_prompt_tokens=max_len // 4,
                              offline_output_tokens=max_len // 4, chunk_tokens=chunk)
        verdict = "meets" if point.meets(ttft_p99_ms, tpot_p99_ms) else "breaks"
        on_progress(f"interference:   {s} seq: TTFT p99 {point.ttft_p99_ms} ms, TPOT p99 {point.tpot_p99_ms} ms, "
                    f"step p99 {point.step_p99_ms} ms, offline {point.offline_tokens_per_s:.1f} tok/s -> {verdict} the SLO")
        return point

    try:
        best, points = search_largest(measure, lambda p: p.meets(ttft_p99_ms, tpot_p99_ms), max_seqs)
    finally:
        ray.get(controller.set_override.remote(None))
    doc = profile_document(best, points, model=config.model.id,
                           slo={"ttft_p99_ms": ttft_p99_ms, "tpot_p99_ms": tpot_p99_ms},
                           online_load={"rate_per_s": rate_per_s, "duration_s": duration_s,
                                        "trace": str(trace) if trace else "../shared/traces/azure_llm_2023_conv.csv"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot_profile(doc, plot)
    return doc
