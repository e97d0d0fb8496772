"""`colocate plan`: the engine configuration that runs the most offline work beside a chat trace
within its SLO, found by a search over the simulator (ExeGPT's idea: choose the execution
configuration from the workload's length distribution under a latency constraint).

Each candidate (per-replica `max_num_seqs` x `max_num_batched_tokens`, then the share of slots
kept for chat) is one simulated colocate run (`bench.simulate`) of the trace at the given rate
and SLO, scored by offline output tokens/s among those whose chat attainment meets the target.
The search exploits two monotonicities instead of gridding everything:

- at a fixed chunk size, more sequence slots never lower the offline capacity the controller can
  use, and only raise the cost of a step at full batch: sequence counts are tried in increasing
  order and the walk stops once a count misses the SLO or gains less than `min_gain`;
- once some chunk size met the SLO, a larger chunk whose smallest sequence count misses it ends
  the walk (a longer prefill chunk only lengthens the steps chat decodes beside); before that,
  larger chunks are tried (a small chunk can miss TTFT by splitting prompts into many steps).

Both are assumptions about the engine; every candidate the search does evaluate is simulated,
and the table of all of them is printed and written, so a wrong turn is visible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.stats import wilson_interval


@dataclass
class PlanOptions:
    rate_per_s: float = 0.8
    duration_s: float = 240.0
    online_trace: Path | None = None
    slo: dict[str, float] | None = None
    target_attainment: float = 0.99
    seq_candidates: tuple[int, ...] = (16, 32, 64, 128, 256)
    chunk_candidates: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    slot_shares: tuple[float, ...] = (0.125, 0.25, 0.5)
    min_gain: float = 0.03
    num_offline_requests: int = 8000
    controller_model: str = "oracle"
    seed: int = 0
    host_steps: Path | None = None
    """Step dataset or trained model of the host planned for (`bench.simulate.SimOptions.host_steps`)."""
    full_lengths: bool = True
    """The trace's lengths as recorded (capped to the context), not the bench's small-model scaling."""


@dataclass
class Candidate:
    max_num_seqs: int
    max_num_batched_tokens: int
    online_slot_share: float
    attainment: float | None = None
    wilson_low: float | None = None
    num_online: int = 0
    offline_tokens_per_s: float = 0.0
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    wall_s: float = 0.0

    def feasible(self, target: float) -> bool:
        return self.attainment is not None and self.attainment >= target


def _with(config, seqs: int, chunk: int, share: float):
    kw = {**config.replicas.engine_kwargs, "max_num_seqs": seqs, "max_num_batched_tokens": chunk}
    policy = config.controller.policy.model_copy(update={"online_slot_share": share})
    return config.model_copy(update={
        "replicas": config.replicas.model_copy(update={"engine_kwargs": kw}),
        "controller": config.controller.model_copy(update={"policy": policy})})


def evaluate(config, opts: PlanOptions, seqs: int, chunk: int, share: float, out_dir: Path) -> Candidate:
    from bench.bench import attainment, met_flags
    from bench.simulate import SimOptions, Simulation

    sim_opts = SimOptions(duration_s=opts.duration_s, rate_per_s=opts.rate_per_s, online_trace=opts.online_trace,
                          policies=("colocate",), sweep_batches=(), slo=opts.slo,
                          num_offline_requests=opts.num_offline_requests, controller_model=opts.controller_model,
                          seed=opts.seed, host_steps=opts.host_steps, full_lengths=opts.full_lengths)
    started = time.monotonic()
    sim = Simulation(_with(config, seqs, chunk, share), sim_opts, out_dir / f"s{seqs}-c{chunk}-o{share:g}",
                     on_progress=lambda _: None)
    sim.slo = {**opts.slo, "source": "given"}
    sim._write_slo(sim.slo)
    row = sim.run_policy("colocate", None, online=True, offline=True)
    met = met_flags(row, opts.slo)
    return Candidate(seqs, chunk, share, attainment(row, opts.slo), wilson_interval(sum(met), len(met))[0] if met else None,
                     len(met), row["offline_tokens_per_s"], row.get("ttft_p99_ms"), row.get("tpot_p99_ms"),
                     time.monotonic() - started)


def search(config, opts: PlanOptions, out_dir: Path, on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The monotone search (module docstring); returns the plan and every candidate evaluated."""
    max_len = int(config.replicas.engine_kwargs.get("max_model_len", 4096))
    tried: list[Candidate] = []
    base_share = config.controller.policy.online_slot_share

    def run(seqs: int, chunk: int, share: float) -> Candidate:
        c = evaluate(config, opts, seqs, chunk, share, out_dir)
        tried.append(c)
        on_progress(f"[plan] max_num_seqs {seqs:>4}, max_num_batched_tokens {chunk:>5}, chat slot share {share:g}: "
                    f"attainment {c.attainment if c.attainment is not None else float('nan'):.3f}, offline "
                    f"{c.offline_tokens_per_s:.0f} tok/s ({c.wall_s:.0f} s)")
        return c

    best: Candidate | None = None
    for chunk in sorted(opts.chunk_candidates):
        if chunk < min(64, max_len):
            continue
        previous: Candidate | None = None
        for seqs in sorted(opts.seq_candidates):
            c = run(seqs, chunk, base_share)
            if not c.feasible(opts.target_attainment):
                break
            if best is None or c.offline_tokens_per_s > best.offline_tokens_per_s * (1 + opts.min_gain):
                best = c  # a larger config must gain min_gain to replace a smaller one (ties: smaller)
            if previous is not None and c.offline_tokens_per_s < previous.offline_tokens_per_s * (1 + opts.min_gain):
                break
            previous = c
        else:
            continue
        if previous is None and not tried[-1].feasible(opts.target_attainment) and best is not None:
            # Infeasible at the smallest sequence count after a smaller chunk was feasible: larger
            # chunks only lengthen the steps chat decodes beside. (Before any feasible chunk the
            # walk goes on: a small chunk can miss TTFT by splitting prompts into many steps.)
            break
    if best is not None:
        for share in opts.slot_shares:
            if share == base_share:
                continue
            c = run(best.max_num_seqs, best.max_num_batched_tokens, share)
            if c.feasible(opts.target_attainment) and c.offline_tokens_per_s > best.offline_tokens_per_s * (1 + opts.min_gain):
                best = c
    return {"best": None if best is None else best.__dict__, "candidates": [c.__dict__ for c in tried],
            "slo": opts.slo, "target_attainment": opts.target_attainment,
            "options": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                        for k, v in opts.__dict__.items()}}


def config_fragment(plan: dict[str, Any]) -> str:
    b = plan["best"]
    if b is None:
        return "# no candidate met the SLO: lower the rate per replica or relax the targets"
    return (f"# colocate plan: predicted (simulated) offline {b['offline_tokens_per_s']:.0f} output tok/s per replica,\n"
            f"# chat attainment {b['attainment']:.3f} (Wilson 95% lower bound {b['wilson_low']:.3f}, "
            f"{b['num_online']} requests) at TTFT p99 <= {plan['slo']['ttft_p99_ms']:.0f} ms, "
            f"TPOT p99 <= {plan['slo']['tpot_p99_ms']:.0f} ms\n"
            "replicas:\n  engine_kwargs:\n"
            f"    max_num_seqs: {b['max_num_seqs']}\n    max_num_batched_tokens: {b['max_num_batched_tokens']}\n"
            "controller:\n  policy:\n"
            f"    online_slot_share: {b['online_slot_share']:g}   # sequence slots offline work never takes\n")


def run_plan(config, opts: PlanOptions, out_dir: Path, on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.slo is None:
        from orchestrator.control.slo import load_slo

        t = load_slo(Path(config.controller.slo_path), {config.model.id}).models[config.model.id]
        opts = replace(opts, slo={"ttft_p99_ms": t.ttft_p99_ms, "tpot_p99_ms": t.tpot_p99_ms})
    if opts.host_steps is not None and not opts.host_steps.is_dir():
        from latency_model.model import train
        from latency_model.schema import read_steps

        on_progress(f"[plan] training the host's step model on {opts.host_steps}")
        model, _ = train(read_steps(opts.host_steps))
        model.save(out_dir / "host-step-model")
        opts = replace(opts, host_steps=out_dir / "host-step-model")
    plan = search(config, opts, out_dir / "runs", on_progress)
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1, default=str) + "\n")
    (out_dir / "plan.yaml").write_text(config_fragment(plan))
    return plan
