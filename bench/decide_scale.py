"""How long the controller's `decide` takes per tick at fleet sizes, as the controller calls it.

`python -m bench.decide_scale --replicas 1,64,256,1024` builds a fleet of replica reports whose
loads differ (online and offline counts, contexts, observed p99s, 48 recent steps each) and ticks
`decide` repeatedly with the controller's `GridCache`, each tick sliding every replica's recent
steps by a few new ones (what a replica reporting every 0.1 s at GPU step times sends between
0.25-s ticks) and drifting its contexts. Prints median and p99 ms per tick, cold (from the 4th
tick) and warm (after 200 ticks), for the GPU roofline and the trained CPU model (the kinds of model a controller has in force).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from latency_model.features import INPUT_COLUMNS
from orchestrator.config import EmulationConfig, PolicyConfig
from orchestrator.control.policy import GridCache, decide
from orchestrator.control.snapshot import ReplicaLoad, SloTargets, Snapshot

ROOT = Path(__file__).resolve().parents[1]


def _steps(rng: np.random.Generator, n: int) -> dict[str, list[float]]:
    decode = rng.integers(1, 64, n).astype(float)
    prefill = np.where(rng.random(n) < 0.3, rng.integers(16, 512, n), 0).astype(float)
    ctx = decode * rng.uniform(200, 1500, n)
    cols = {"num_prefill_tokens": prefill, "num_prefill_reqs": (prefill > 0).astype(float),
            "prefill_context_tokens": np.zeros(n), "prefill_attention_tokens2": prefill * prefill / 2,
            "num_decode_reqs": decode, "decode_context_tokens": ctx, "max_decode_context_tokens": ctx / decode * 1.5,
            "step_latency_ms": 8 + 0.2 * decode + 0.02 * prefill + rng.normal(0, 0.3, n)}
    assert set(INPUT_COLUMNS) <= set(cols)
    return {k: v.tolist() for k, v in cols.items()}


def fleet(num: int, rng: np.random.Generator, spread: float) -> list[dict]:
    """Replicas serving one workload: their mean contexts spread around the fleet's by `spread`
    (log-normal sigma; 0.2: most replicas within 20% of each other; 1.0: a fleet of unlike ones)."""
    out = []
    for i in range(num):
        k, off = int(rng.integers(0, 16)), int(rng.integers(0, 64))
        on, off_ctx = 600.0 * float(np.exp(rng.normal(0, spread))), 1200.0 * float(np.exp(rng.normal(0, spread)))
        out.append({"id": f"replica-{i}", "k": k, "off": off, "on_mean": on, "off_mean": off_ctx,
                    "steps": _steps(rng, 48)})
    return out


def tick_loads(replicas: list[dict], rng: np.random.Generator, now_s: float) -> tuple[ReplicaLoad, ...]:
    loads = []
    for r in replicas:
        new = _steps(rng, int(rng.integers(1, 6)))
        r["steps"] = {c: (r["steps"][c] + new[c])[-48:] for c in r["steps"]}
        # What the controller holds for each replica: its report's steps as arrays (converted
        # when the report arrives, off the tick).
        steps = {c: np.asarray(v, dtype=np.float64) for c, v in r["steps"].items()}
        # A steady replica's mean contexts wander around their own level (10% spread) as requests
        # come and go.
        on_ctx = r["on_mean"] * float(np.exp(rng.normal(0.0, 0.1)))
        off_ctx = r["off_mean"] * float(np.exp(rng.normal(0.0, 0.1)))
        loads.append(ReplicaLoad(r["id"], num_online=r["k"], online_context_tokens=r["k"] * on_ctx,
                                 num_offline_running=r["off"], offline_context_tokens=r["off"] * off_ctx,
                                 observed_ttft_p99_ms=float(rng.uniform(100, 400)),
                                 observed_tpot_p99_ms=float(rng.uniform(10, 20)), step_p50_ms=10.0,
                                 kv_cache_usage=0.5, reported_at_s=now_s, recent_steps=steps, max_num_seqs=128))
    return tuple(loads)


def measure(model, num: int, num_ticks: int, seed: int = 0, spread: float = 0.2,
            warm_after: int = 200) -> dict[str, float]:
    """Ticks `decide` as a controller does: `num_ticks` ticks from the 4th (the first ticks fill
    the grid cache, as after any model change) and `num_ticks` more after `warm_after` ticks,
    when most context buckets the fleet visits are cached (a bucket seen for the first time
    costs a grid prediction on that tick: the share of such ticks is reported)."""
    rng = np.random.default_rng(seed)
    replicas = fleet(num, rng, spread)
    cfg, cache, state = PolicyConfig(), GridCache(), {}
    times, missed = [], []
    for t in range(warm_after + num_ticks):
        snap = Snapshot(now_s=0.25 * t, slo=SloTargets(600.0, 50.0), replicas=tick_loads(replicas, rng, 0.25 * t))
        cached = len(cache.index)
        start = time.perf_counter()
        decision = decide(snap, state, model, cfg, cache)
        times.append((time.perf_counter() - start) * 1000.0)
        missed.append(len(cache.index) > cached)
        state = decision.state
    cold, warm = np.array(times[3:3 + num_ticks]), np.array(times[warm_after:])
    return {"replicas": num, "ticks": num_ticks, "median_ms": float(np.median(cold)),
            "p99_ms": float(np.percentile(cold, 99)), "max_ms": float(cold.max()), "first_tick_ms": times[0],
            "warm_after_ticks": warm_after, "warm_median_ms": float(np.median(warm)),
            "warm_p99_ms": float(np.percentile(warm, 99)),
            "warm_share_ticks_new_bucket": float(np.mean(missed[warm_after:])), "grid_entries": len(cache.index)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="1,64,256,1024")
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--warm-after", type=int, default=200,
                    help="Ticks before the warm window (200: 50 s of a controller's life at 0.25-s ticks).")
    ap.add_argument("--spread", type=float, default=0.2, help="Spread of the replicas' mean contexts (log-normal sigma).")
    ap.add_argument("--out", type=Path, default=None, help="Write the rows as JSON here.")
    args = ap.parse_args()
    from latency_model.fast_trees import CompiledModel
    from latency_model.model import train
    from latency_model.schema import read_steps

    trained, _ = train(read_steps(ROOT / "profiler" / "data" / "cpu-bench-profile.parquet"))
    # As the controller holds it: `latency_model.model.load` and the live model both evaluate
    # through the compiled walk of the same trees, not XGBoost's per-call `inplace_predict`.
    trained.compiled = CompiledModel.from_booster(trained.booster)
    rows = []
    for name, model in (("roofline (8B on A100-80GB)", EmulationConfig().roofline()), ("trained CPU model", trained)):
        for num in (int(v) for v in args.replicas.split(",")):
            row = {"model": name, "spread": args.spread, **measure(model, num, args.ticks, spread=args.spread, warm_after=args.warm_after)}
            rows.append(row)
            print(f"{name:<28} {num:>5} replicas: decide median {row['median_ms']:6.1f} ms, "
                  f"p99 {row['p99_ms']:6.1f} ms per tick (ticks 4-{3 + args.ticks}); after {args.warm_after} ticks "
                  f"median {row['warm_median_ms']:6.1f}, p99 {row['warm_p99_ms']:6.1f} ms "
                  f"({row['warm_share_ticks_new_bucket']:.0%} of ticks met a new context bucket); "
                  f"first tick (empty cache) {row['first_tick_ms']:5.0f} ms", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
