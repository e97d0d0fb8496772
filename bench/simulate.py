"""`colocate simulate`: the bench's policies side by side, in simulated time, on N replicas.

Each policy run is one `orchestrator.sim.cluster.SimCluster` (fresh engines, the same chat trace
and offline backlog as `colocate bench` builds them), with the production controller
(`ControllerCore`, the bench's override for static caps and naive) and the production step
planning inside each simulated engine. Results go through the bench's own `summarize`, `plot` and
`format_table`, so a simulated results.json reads like a real one, labelled `simulated`.

Step time: the emulated engine's roofline when the config says `engine: emulated`, else the
trained CPU latency model (what the bench's controller uses), optionally scaled (`step_scale`:
a host that many times slower). The controller's model is what the config gives it (the bench's
trained CPU model as prior, refit on live steps when `learn_online`), or the step model itself
(`controller_model="oracle"`).
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.bench import (
    UNLIMITED_BUDGET,
    attainment,
    backlog_dry_s,
    chat_metrics,
    counter_delta,
    format_table,
    length_limits,
    plot,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
CPU_PROFILE = ROOT / "profiler" / "data" / "cpu-bench-profile.parquet"


@dataclass
class SimOptions:
    num_replicas: int = 1
    duration_s: float = 380.0
    rate_per_s: float = 0.8
    """Chat requests per second for the whole fleet (trace inter-arrivals scaled)."""
    online_trace: Path | None = None
    offline_trace: Path | None = None
    policies: tuple[str, ...] | None = None
    """None: every policy the bench runs (online-only, offline-only, colocate, static caps, naive)."""
    static_caps: tuple[int, ...] = (1, 2, 4)
    sweep_batches: tuple[int, ...] = (2, 4, 8, 16, 32)
    sweep_s: float = 10.0
    offline_only_s: float = 45.0
    settle_s: float = 10.0
    drain_s: float = 60.0
    slo_tolerance: float | None = 0.5
    num_offline_requests: int = 4000
    job_concurrency: int = 64
    seed: int = 0
    step_scale: float = 1.0
    controller_model: str = "config"
    """`config`: the controller's model as the stack would have it; `oracle`: the step model."""
    client_overhead_ms: float = 0.0
    host_overhead_ms: float = 0.0
    refit: bool = True
    slo: dict[str, float] | None = None
    """Explicit targets (`ttft_p99_ms`, `tpot_p99_ms`); None: derived as the bench does."""
    full_lengths: bool = False
    """Trace lengths as recorded (capped to the context: output at a quarter of it, the prompt
    at the rest) instead of the bench's scaling to a small model's context."""
    host_steps: Path | None = None
    """The simulated host's steps: a step dataset or a trained model (None: the controller's model)."""
    offline_routing: str | None = None
    """`serve` or `room` (orchestrator.control.routing); None: the config's `serve.offline_routing`."""
    length_error_sigma: float = 0.7
    """With `order.policy: sjf`, a chat request's predicted reply length is its real one times a
    log-normal error of this sigma (0: an oracle): the traces carry lengths, not the prompts a
    predictor reads. Not fitted to the trained predictor's rank quality; say which you used."""


class ScaledModel:
    """A latency model whose predictions are multiplied by `scale` (a slower or faster host)."""

    def __init__(self, model, scale: float) -> None:
        self.model, self.scale = model, scale

    def predict_ms(self, features):
        p50, p99 = self.model.predict_ms(features)
        return p50 * self.scale, p99 * self.scale


def step_model(config, out_dir: Path, on_progress: Callable[[str], None], need_prior: bool = True,
               host_steps: Path | None = None):
    """(step-time model, its label, the controller's prior model path or None). `host_steps`: a
    step dataset (`colocate profile`) or trained model of the host to simulate; its steps then
    come from that model while the controller keeps its own prior, as on a real stack."""
    from latency_model.model import load, train
    from latency_model.schema import read_steps

    emulated = config.replicas.engine == "emulated"
    model_path = config.controller.model_path
    if model_path is None and (need_prior or (not emulated and host_steps is None)):
        target = out_dir / "latency-model"
        if not target.exists():
            on_progress("[simulate] training the step-latency model on the committed CPU profile")
            trained, _ = train(read_steps(CPU_PROFILE))
            trained.save(target)
        model_path = str(target.resolve())
    if host_steps is not None:
        if host_steps.is_dir():
            return load(str(host_steps)), f"the CPU step model at {host_steps}", model_path
        target = out_dir / "host-step-model"
        if not target.exists():
            on_progress(f"[simulate] training the host's step model on {host_steps}")
            trained, _ = train(read_steps(host_steps))
            trained.save(target)
        return load(str(target)), f"the CPU step model of {host_steps.name}", model_path
    if emulated:
        emu = config.replicas.emulation
        return emu.roofline(), f"{emu.model_shape} on {emu.gpu} (roofline model)", model_path
    return load(model_path), "the trained CPU step model", model_path


def engine_config(config):
    from orchestrator.sim.engine import SimEngineConfig

    kw = config.replicas.engine_kwargs
    max_len = int(kw.get("max_model_len", 1024))
    max_seqs = int(kw.get("max_num_seqs", 256))
    block_size = int(kw.get("block_size", 16))
    if config.replicas.engine == "emulated":
        emu = config.replicas.emulation
        tokens = emu.kv_cache_tokens or emu.roofline().kv_cache_tokens(emu.gpu_memory_utilization)
    else:
        tokens = max_seqs * max_len  # a CPU replica's 1 GiB holds every slot at full length
    return SimEngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=int(kw.get("max_num_batched_tokens", 2048)),
                           block_size=block_size, num_gpu_blocks=max(1, tokens // block_size),
                           long_prefill_token_threshold=int(kw.get("long_prefill_token_threshold", 0)),
                           max_model_len=max_len)


class Simulation:
    def __init__(self, config, opts: SimOptions, out_dir: Path, on_progress: Callable[[str], None] = print) -> None:
        from latency_model.live import LiveModelFitter
        from latency_model.model import load

        self.config, self.opts, self.out_dir, self.on_progress = config, opts, out_dir, on_progress
        out_dir.mkdir(parents=True, exist_ok=True)
        self.step_model, self.step_label, self.prior_path = step_model(
            config, out_dir, on_progress, need_prior=opts.controller_model == "config", host_steps=opts.host_steps)
        if opts.step_scale != 1.0:
            self.step_model = ScaledModel(self.step_model, opts.step_scale)
            self.step_label += f" x {opts.step_scale:g}"
        self.engine_cfg = replace(engine_config(config), host_overhead_ms=opts.host_overhead_ms)
        self.max_len = self.engine_cfg.max_model_len
        # One live fitter across the runs, as one stack's controller learns across the bench.
        self.fitter = (LiveModelFitter(load(self.prior_path)) if config.controller.learn_online
                       and opts.controller_model == "config" else None)
        self.slo_file = out_dir / "slo.yaml"
        self.slo_file.write_text(Path(config.controller.slo_path).read_text()
                                 if Path(config.controller.slo_path).is_file() else "models: {}\n")
        self.slo: dict[str, float] | None = None
        self.num_jobs = 0
        self.wall_started = time.monotonic()

    def log(self, msg: str) -> None:
        self.on_progress(f"[simulate {time.monotonic() - self.wall_started:5.0f}s] {msg}")

    # --- workload (as the bench builds it) --------------------------------------------------------

    def chat(self):
        from orchestrator.sim.cluster import ChatRequest
        from profiler.workload import AZURE_CONV, load_chat_trace

        limits = length_limits(self.max_len, self.opts.full_lengths, "chat")
        trace = self.opts.online_trace
        if trace is not None and trace.suffix == ".parquet":
            if getattr(self, "_sharegpt", None) is None:
                self._sharegpt = self._sharegpt_chat(trace, limits["max_prompt_tokens"], limits["max_output_tokens"])
            return list(self._sharegpt)
        specs = load_chat_trace(self.opts.online_trace or AZURE_CONV, rate_per_s=self.opts.rate_per_s,
                                duration_s=self.opts.duration_s, repeat=True, **limits)
        return [ChatRequest(s.arrival_s, s.num_prompt_tokens, s.num_output_tokens) for s in specs]

    def _sharegpt_chat(self, path: Path, max_prompt: int, max_output: int):
        """Chat from a table of real prompts and replies (ShareGPT's first turns: `prompt`,
        `response`): lengths in the served model's tokenizer where its directory has one (else
        1.3 tokens per whitespace-separated word, stated in the run's label), Poisson arrivals at
        the rate (the table has no timestamps), rows drawn with the seed."""
        import numpy as np

        from latency_model.length.data import read_pairs, tokenizer_counter
        from orchestrator.sim.cluster import ChatRequest

        _, prompts, responses = read_pairs(path)
        num = max(int(round(self.opts.rate_per_s * self.opts.duration_s)), 1)
        rng = np.random.default_rng(self.opts.seed)
        rows = rng.choice(len(prompts), size=num, replace=num > len(prompts))
        texts_p, texts_r = [prompts[i] for i in rows], [responses[i] for i in rows]
        try:
            count = tokenizer_counter(self.config.model.source)
            self.step_label += f"; chat lengths from {path.name} in the model's tokenizer"
        except Exception:  # noqa: BLE001 - no tokenizer built here: an estimate, said so
            def count(texts):
                return np.asarray([max(1, round(1.3 * len(t.split()))) for t in texts])
            self.step_label += f"; chat lengths from {path.name} at 1.3 tokens per word (no tokenizer)"
        p_tokens = np.clip(count(texts_p), 1, max_prompt)
        r_tokens = np.clip(count(texts_r), 1, max_output)
        arrivals = np.cumsum(rng.exponential(1.0 / self.opts.rate_per_s, num)) - 0.0
        return [ChatRequest(float(a - arrivals[0]), int(pt), int(rt)) for a, pt, rt in zip(arrivals, p_tokens, r_tokens)]

    def _chat_priority(self):
        """Length-ordering levels from predicted reply lengths (see `length_error_sigma`), through
        the engine's own `priority_level`."""
        import numpy as np

        from orchestrator.engine.order import priority_level
        from orchestrator.request_class import RequestClass, vllm_priority

        rng = np.random.default_rng(self.opts.seed + 17)
        cfg, sigma = self.config.order, self.opts.length_error_sigma

        def priority(r) -> int:
            predicted = r.num_output_tokens * float(np.exp(rng.normal(0.0, sigma))) if sigma > 0 else r.num_output_tokens
            return vllm_priority(RequestClass.ONLINE, priority_level(predicted, 1.0, cfg))

        return priority

    def offline(self, seed: int) -> list[tuple[int, int]]:
        from profiler.workload import ARXIV_LENGTHS, load_offline_lengths

        specs = load_offline_lengths(self.opts.offline_trace or ARXIV_LENGTHS,
                                     num_requests=self.opts.num_offline_requests, seed=seed,
                                     **length_limits(self.max_len, self.opts.full_lengths, "offline"))
        return [(s.num_prompt_tokens, s.num_output_tokens) for s in specs]

    # --- one run ------------------------------------------------------------------------------

    def _write_slo(self, slo: dict[str, float] | None) -> None:
        import yaml

        doc = yaml.safe_load(self.slo_file.read_text()) or {}
        doc.setdefault("models", {})
        entry = doc["models"].setdefault(self.config.model.id, {})
        if slo is not None:
            entry.update(ttft_p99_ms=round(slo["ttft_p99_ms"], 1), tpot_p99_ms=round(slo["tpot_p99_ms"], 1))
        elif "ttft_p99_ms" not in entry:
            entry.update(ttft_p99_ms=1e9, tpot_p99_ms=1e9)  # online-only needs none; a placeholder target
        self.slo_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    def controller(self, clock):
        from orchestrator.control.controller import ControllerCore, MemoryCheckpoint

        c = self.config.controller

        core = ControllerCore(model_id=self.config.model.id, slo_path=str(self.slo_file), period_s=c.period_s,
                              silence_timeout_s=c.silence_timeout_s,
                              model_path=None if self.opts.controller_model == "oracle" else self.prior_path,
                              profile_path=None, policy=c.policy.model_dump(mode="json", exclude_unset=True), clock=clock,
                              store=MemoryCheckpoint(), metrics=False, admission=lambda total: None,
                              learn_online=False, refit_period_s=c.refit_period_s)
        if self.opts.controller_model == "oracle":
            core.latency_model = self.step_model
        elif self.fitter is not None:
            core.fitter = self.fitter
        return core

    def run_policy(self, name: str, budget: dict[str, list[int]] | None, *, online: bool, offline: bool,
                   duration_s: float | None = None) -> dict[str, Any]:
        from orchestrator.engine.budget import OfflineBudget
        from orchestrator.sim.cluster import ClusterTimings, SimCluster, SimJob
        from orchestrator.sim.engine import SimEngine

        o = self.opts
        duration_s = duration_s or (o.duration_s if online else o.offline_only_s)
        clock_box = [0.0]
        core = self.controller(lambda: clock_box[0])
        if budget is not None:
            core.set_override(budget)
        c = self.config.controller
        fallback = OfflineBudget.flat(c.fallback_offline_seqs, c.fallback_offline_tokens)
        order = self.config.order
        engines = [SimEngine(f"replica-{i}", self.engine_cfg, self.step_model, fallback=fallback,
                             offline_policy=order.offline_policy, order=order)
                   for i in range(o.num_replicas)]
        timings = ClusterTimings(report_period_s=c.report_period_s, client_overhead_ms=o.client_overhead_ms)
        serve_cfg = self.config.serve
        cluster = SimCluster(engines, core, timings, seed=o.seed, refit=o.refit, job_policy=order.job_policy,
                             chat_priority=self._chat_priority() if order.policy != "fcfs" else None,
                             max_ongoing_requests=self.config.replicas.effective_max_ongoing_requests,
                             offline_routing=o.offline_routing or serve_cfg.offline_routing,
                             routing_stats_period_s=serve_cfg.routing_stats_period_s)
        core.clock = lambda: cluster.now_s
        start_s = o.settle_s if offline else 0.0
        if offline:
            self.num_jobs += 1
            cluster.add_job(SimJob(f"backlog-{self.num_jobs}", self.offline(self.num_jobs), default_cap=o.job_concurrency))
        if online:
            cluster.add_chat(self.chat(), offset_s=start_s)
        t1 = start_s + duration_s
        wall0 = time.monotonic()
        cluster.run(t1)
        samples = list(cluster.samples)
        if online:  # let the last chat requests finish (their latencies count), up to drain_s
            t = t1
            while t < t1 + o.drain_s and any(req.finished_s is None for _, req in cluster.chat):
                t = min(t + 1.0, t1 + o.drain_s)
                cluster.run(t)
        outcomes = cluster.chat_outcomes(start_s, t1) if online else []
        elapsed = duration_s
        offline_tps = counter_delta(samples, "num_offline_output_tokens_total", start_s, t1) / elapsed
        row = {
            "policy": name, "budget": budget, "elapsed_s": elapsed,
            **(chat_metrics(outcomes, self.slo) if online else {}),
            "offline_tokens_per_s": offline_tps,
            "offline_prompt_tokens_per_s": counter_delta(samples, "num_offline_prompt_tokens_total", start_s, t1) / elapsed,
            "online_tokens_per_s": counter_delta(samples, "num_online_tokens_total", start_s, t1) / elapsed,
            "backlog_dry_s": 0.0 if not offline else backlog_dry_s(samples, start_s, t1),
            "engine_busy_fraction": counter_delta(samples, "step_time_s_total", start_s, t1) / elapsed / o.num_replicas,
            "offline_preempted": counter_delta(samples, "num_offline_preempted_total", start_s, t1),
            "throttle_reaction_ms": [],
            "timeseries": _fleet_series(samples, start_s),
            "sim_wall_s": time.monotonic() - wall0,
            "simulated_s": cluster.now_s,
            "num_replicas": o.num_replicas,
            "controller_tick_ms": _spread(cluster.tick_wall_ms),
            "max_router_queue": cluster.max_router_queue,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        }
        row["total_tokens_per_s"] = row["offline_tokens_per_s"] + row["online_tokens_per_s"]
        if online:
            row["num_online_unfinished"] = sum(1 for r in outcomes if not r.ok)
        if offline:
            from orchestrator.stats import percentile

            done = [r.tpot_ms for e in engines for r in e.finished
                    if r.is_offline and r.finished_s is not None and start_s <= r.finished_s <= t1
                    and r.tpot_ms is not None]
            row.update(offline_tpot_p50_ms=percentile(done, 50), offline_tpot_p99_ms=percentile(done, 99),
                       offline_num_finished=len(done))
        self.log(f"{name}: " + ", ".join(f"{k} {row[k]:.3g}" for k in (
            "ttft_p99_ms", "tpot_p99_ms", "slo_attainment", "offline_tokens_per_s", "engine_busy_fraction",
            "sim_wall_s") if row.get(k) is not None)
                 + (f", controller tick {row['controller_tick_ms']['median']:.1f} ms median"
                    if row["controller_tick_ms"]["median"] is not None else ""))
        return row

    def sweep(self) -> list[dict[str, Any]]:
        """Offline work alone at steady batch sizes (the bench's SLO-bounded ceiling): TPOT p99
        of the offline requests that finished in the window, and output tokens/s."""
        rows = []
        for b in self.opts.sweep_batches:
            row = self.run_policy(f"sweep-b{b}", {"max_offline_seqs": [b], "max_offline_tokens": [b + 64]},
                                  online=False, offline=True, duration_s=self.opts.sweep_s)
            rows.append({"batch": b, "offline_tokens_per_s": row["offline_tokens_per_s"],
                         "tpot_p50_ms": row.get("offline_tpot_p50_ms"), "tpot_p99_ms": row.get("offline_tpot_p99_ms"),
                         "num_requests": row.get("offline_num_finished")})
        return rows

    def run(self) -> dict[str, Any]:
        o = self.opts
        chosen = o.policies or ("online-only", "offline-only", "colocate",
                                *(f"static-{c}" for c in o.static_caps), "naive")
        self._write_slo(None)
        runs: dict[str, list[dict[str, Any]]] = {}
        if o.slo is not None:
            self.slo = {**o.slo, "source": "given"}
            self._write_slo(self.slo)
        elif o.slo_tolerance is not None:
            runs["online-only"] = [self.run_policy("online-only", {"max_offline_seqs": [0], "max_offline_tokens": [0]},
                                                   online=True, offline=False)]
            ref = runs["online-only"][0]
            self.slo = {"ttft_p99_ms": ref["ttft_p99_ms"] * (1 + o.slo_tolerance),
                        "tpot_p99_ms": ref["tpot_p99_ms"] * (1 + o.slo_tolerance),
                        "source": f"online-only p99 x {1 + o.slo_tolerance:g} (simulated)"}
            self._write_slo(self.slo)
            ref["slo_attainment"] = attainment(ref, self.slo)
        else:
            from orchestrator.control.slo import load_slo

            t = load_slo(self.slo_file, {self.config.model.id}).models[self.config.model.id]
            if t.ttft_p99_ms >= 1e9:
                raise ValueError(f"{self.config.controller.slo_path} has no SLO for {self.config.model.id}: "
                                 "give one, or derive it from online-only (slo_tolerance)")
            self.slo = {"ttft_p99_ms": t.ttft_p99_ms, "tpot_p99_ms": t.tpot_p99_ms, "source": str(self.slo_file)}
        self.log(f"SLO: TTFT p99 <= {self.slo['ttft_p99_ms']:.0f} ms, TPOT p99 <= {self.slo['tpot_p99_ms']:.0f} ms")
        sweep = self.sweep() if o.sweep_batches and "offline-only" in chosen else []
        for name in chosen:
            if name == "online-only":
                if name not in runs:
                    runs[name] = [self.run_policy(name, {"max_offline_seqs": [0], "max_offline_tokens": [0]},
                                                  online=True, offline=False)]
                    runs[name][0]["slo_attainment"] = attainment(runs[name][0], self.slo)
            elif name == "offline-only":
                runs[name] = [self.run_policy(name, UNLIMITED_BUDGET, online=False, offline=True)]
            elif name == "colocate":
                runs[name] = [self.run_policy(name, None, online=True, offline=True)]
            elif name == "naive":
                runs[name] = [self.run_policy(name, UNLIMITED_BUDGET, online=True, offline=True)]
            elif name.startswith("static-"):
                cap = int(name.split("-", 1)[1])
                runs[name] = [self.run_policy(name, {"max_offline_seqs": [cap], "max_offline_tokens": [cap + 64]},
                                              online=True, offline=True)]
            else:
                raise ValueError(f"unknown policy {name!r}")
        if "colocate" in runs:
            runs = {**{k: v for k, v in runs.items() if k != "colocate"}, "colocate": runs["colocate"]}
        summary = summarize(runs, sweep, self.slo)
        summary["engine"] = f"simulated: {self.step_label}"
        summary["model"] = self.config.model.id
        summary["online_load"] = {"rate_per_s": o.rate_per_s, "duration_s": o.duration_s,
                                  "trace": str(o.online_trace or "azure_llm_2023_conv.csv"),
                                  "num_replicas": o.num_replicas}
        summary["options"] = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                              for k, v in o.__dict__.items()}
        summary["simulated"] = True
        path = self.out_dir / "results.json"
        path.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=str) + "\n")
        (self.out_dir / "summary.txt").write_text(format_table(summary) + "\n")
        summary["plots"] = [str(p) for p in plot(runs, summary, self.out_dir)]
        return summary


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p99": None, "max": None, "count": 0}
    from orchestrator.stats import percentile

    return {"median": percentile(values, 50), "p99": percentile(values, 99), "max": max(values), "count": len(values)}


def _fleet_series(samples: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """The bench's time-series rows, summed over replicas (one row per sample time)."""
    by_t: dict[float, dict[str, Any]] = {}
    for s in samples:
        row = by_t.setdefault(s["t"], {"t": s["t"] - t0, "online_requests": 0, "offline_running": 0,
                                       "num_offline_tokens_total": 0.0, "offline_budget_seqs": 0,
                                       "throttle": None, "throttle_scale": None, "pressure": None,
                                       "observed_ttft_p99_ms": None, "observed_tpot_p99_ms": None,
                                       "predicted_step_ms": None, "model_calibration": None})
        row["online_requests"] += s["online_requests"]
        row["offline_running"] += s["offline_running"]
        row["num_offline_tokens_total"] += s["num_offline_tokens_total"]
        row["offline_budget_seqs"] += s["offline_budget_seqs"]
    return [by_t[t] for t in sorted(by_t)]

