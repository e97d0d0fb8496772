"""The planner's monotone search over the simulator, and the config fragment it prints."""

from __future__ import annotations

import yaml

from bench.plan import Candidate, PlanOptions, config_fragment, search
from orchestrator.config import ColocateConfig, load_config


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def test_search_walks_monotonically_and_picks_the_best_feasible(monkeypatch, tmp_path):
    # A fake engine: offline throughput grows with sequences until 64, attainment breaks at 128
    # sequences and at chunks of 2048 or more.
    import bench.plan as plan

    calls = []

    def fake(config, opts, seqs, chunk, share, out_dir):
        calls.append((seqs, chunk, share))
        ok = seqs < 128 and chunk < 2048
        tps = min(seqs, 64) * (1.0 + chunk / 4096) * (1.1 if share == 0.125 else 1.0)
        return Candidate(seqs, chunk, share, 1.0 if ok else 0.9, 0.98 if ok else 0.85, 300, tps)

    monkeypatch.setattr(plan, "evaluate", fake)
    config = load_config("manifests/colocate-emulated.yaml")
    opts = PlanOptions(slo={"ttft_p99_ms": 600, "tpot_p99_ms": 50}, seq_candidates=(16, 32, 64, 128, 256),
                       chunk_candidates=(512, 1024, 2048, 4096), slot_shares=(0.125, 0.25))
    result = search(config, opts, tmp_path, on_progress=lambda _: None)
    best = result["best"]
    assert (best["max_num_seqs"], best["max_num_batched_tokens"], best["online_slot_share"]) == (64, 1024, 0.125)
    # The walk stopped at the first infeasible count per chunk and pruned chunks beyond the first
    # one infeasible at 16 sequences: 256 sequences and 4096 tokens were never simulated.
    assert (256, 512, 0.25) not in calls and all(c[1] != 4096 for c in calls)
    assert (16, 2048, 0.25) in calls
    fragment = yaml.safe_load(config_fragment(result))
    merged = _merge(config.model_dump(mode="json"), fragment)
    cfg = ColocateConfig.model_validate(merged)
    assert cfg.replicas.engine_kwargs["max_num_seqs"] == 64 and cfg.controller.policy.online_slot_share == 0.125


def test_plan_runs_the_simulator_end_to_end(tmp_path):
    from bench.plan import run_plan

    config = load_config("manifests/colocate-emulated.yaml")
    opts = PlanOptions(rate_per_s=2.0, duration_s=10.0, slo={"ttft_p99_ms": 800, "tpot_p99_ms": 60},
                       seq_candidates=(16, 32), chunk_candidates=(512,), slot_shares=(0.25,),
                       num_offline_requests=2000)
    result = run_plan(config, opts, tmp_path / "plan", on_progress=lambda _: None)
    assert (tmp_path / "plan" / "plan.json").is_file() and (tmp_path / "plan" / "plan.yaml").is_file()
    assert len(result["candidates"]) >= 1
    feasible = [c for c in result["candidates"] if c["attainment"] is not None and c["attainment"] >= 0.99]
    if feasible:
        assert result["best"]["offline_tokens_per_s"] == max(c["offline_tokens_per_s"] for c in feasible)
    assert all(c["num_online"] == 20 for c in result["candidates"])
