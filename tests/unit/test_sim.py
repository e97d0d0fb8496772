"""The simulator: its event loop, its engine's scheduling rules, one case checked by hand, and
that it runs the production decision code (not a copy)."""

from __future__ import annotations

import numpy as np
import pytest

from latency_model.features import FEATURE_NAMES
from orchestrator.engine import enforce
from orchestrator.engine.budget import OfflineBudget
from orchestrator.sim.cluster import OFFLINE_PRIORITY, ONLINE_PRIORITY, ChatRequest, SimCluster, SimJob
from orchestrator.sim.engine import SimEngine, SimEngineConfig, SimRequest


class FixedStep:
    """Every step takes `base_ms` plus `per_token_ms` per scheduled token."""

    def __init__(self, base_ms: float = 10.0, per_token_ms: float = 0.0) -> None:
        self.base_ms, self.per_token_ms = base_ms, per_token_ms

    def predict_ms(self, features):
        x = np.asarray(features)
        tokens = x[:, FEATURE_NAMES.index("num_prefill_tokens")] + x[:, FEATURE_NAMES.index("num_decode_reqs")]
        ms = self.base_ms + self.per_token_ms * tokens
        return ms, ms


def run_alone(engine: SimEngine, until_s: float = 10.0) -> None:
    t = 0.0
    while t < until_s:
        end = engine.start_step(t)
        if end is None:
            return
        engine.finish_step()
        t = end


def test_one_chat_request_by_hand():
    # A 32-token prompt at 16 tokens per step: two prefill steps (the second emits the first
    # token), then three decode steps for tokens 2-4. Steps of 10 ms: first token at 20 ms,
    # the last at 50 ms, TPOT (50 - 20) / 3 = 10 ms.
    e = SimEngine("r", SimEngineConfig(max_num_batched_tokens=16, num_gpu_blocks=100), FixedStep(10.0))
    e.override = OfflineBudget.flat(0, 0)
    req = SimRequest("c", ONLINE_PRIORITY, 0.0, num_prompt_tokens=32, max_tokens=4)
    e.add_request(req)
    run_alone(e)
    assert req.first_token_s == pytest.approx(0.020)
    assert req.finished_s == pytest.approx(0.050)
    assert req.ttft_ms == pytest.approx(20.0)
    assert req.tpot_ms == pytest.approx(10.0)
    assert e.counters.num_steps_total == 5
    assert e.num_free_blocks() == 100  # every block back


def test_offline_budget_is_enforced_each_step():
    e = SimEngine("r", SimEngineConfig(max_num_seqs=16, max_num_batched_tokens=256, num_gpu_blocks=1000),
                  FixedStep(5.0))
    e.override = OfflineBudget.flat(2, 64)
    reqs = [SimRequest(f"o{i}", OFFLINE_PRIORITY, 0.0, 8, 6) for i in range(6)]
    for r in reqs:
        e.add_request(r)
    rows = []
    t = 0.0
    while (end := e.start_step(t)) is not None:
        rows.append(e.in_flight.record)
        e.finish_step()
        t = end
    assert all(r.finished_s is not None and r.num_output_tokens == 6 for r in reqs)
    assert max(r["num_offline_reqs"] for r in rows) == 2
    assert max(r["num_offline_tokens"] for r in rows) <= 64


def test_kv_pressure_preempts_offline_never_chat():
    # 10 blocks of 16 tokens: three offline requests of 40 tokens (3 blocks each) fill 9; chat
    # arriving with a 48-token prompt needs 4: an offline request is preempted, chat is not.
    e = SimEngine("r", SimEngineConfig(max_num_seqs=8, max_num_batched_tokens=512, num_gpu_blocks=10), FixedStep(5.0))
    e.override = OfflineBudget.flat(8, 512)
    offline = [SimRequest(f"o{i}", OFFLINE_PRIORITY, 0.0, 40, 4) for i in range(3)]
    for r in offline:
        e.add_request(r)
    e.start_step(0.0)
    e.finish_step()
    chat = SimRequest("c", ONLINE_PRIORITY, 0.01, 48, 3)
    e.add_request(chat)
    run_alone(e)
    assert chat.num_preemptions == 0 and chat.finished_s is not None
    assert sum(r.num_preemptions for r in offline) >= 1
    assert e.counters.num_offline_preempted_total >= 1
    assert all(r.finished_s is not None and r.num_output_tokens == 4 for r in offline)
    assert e.num_free_blocks() == 10


def test_simulator_calls_the_engines_planning_code(monkeypatch):
    calls = []
    real = enforce.plan_step

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(enforce, "plan_step", spy)
    e = SimEngine("r", SimEngineConfig(num_gpu_blocks=100), FixedStep(5.0))
    e.override = OfflineBudget.flat(1, 16)
    e.add_request(SimRequest("o", OFFLINE_PRIORITY, 0.0, 8, 3))
    run_alone(e)
    assert len(calls) == e.counters.num_steps_total == 3
    assert calls[0]["max_offline_seqs"] == 1


def _cluster(num_replicas: int, seed: int, budget=OfflineBudget.flat(4, 64)) -> SimCluster:
    engines = [SimEngine(f"r{i}", SimEngineConfig(max_num_seqs=16, max_num_batched_tokens=128, num_gpu_blocks=2000),
                         FixedStep(8.0, 0.05)) for i in range(num_replicas)]
    for e in engines:
        e.override = budget
    cluster = SimCluster(engines, controller=None, seed=seed)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(0.2, 60))
    cluster.add_chat([ChatRequest(float(t), int(rng.integers(8, 64)), int(rng.integers(2, 20))) for t in arrivals])
    cluster.add_job(SimJob("job", [(int(rng.integers(16, 128)), int(rng.integers(4, 32))) for _ in range(200)],
                    default_cap=12))
    return cluster


def test_event_loop_is_deterministic_and_loses_nothing():
    a, b = _cluster(3, seed=7), _cluster(3, seed=7)
    a.run(300.0)
    b.run(300.0)
    out_a = [(o.ttft_s, o.tpot_s, o.replica) for o in a.chat_outcomes()]
    out_b = [(o.ttft_s, o.tpot_s, o.replica) for o in b.chat_outcomes()]
    assert out_a == out_b
    assert len(out_a) == 60 and all(o.ok for o in a.chat_outcomes())
    job = a.jobs[0]
    assert job.done == job.total == 200 and job.in_flight == 0
    # Exactly one completion per offline request, spread over the replicas by the router.
    finished = [r.request_id for e in a.engines for r in e.finished if r.is_offline]
    assert sorted(finished) == sorted(f"job-{i}" for i in range(200))
    assert len({e.replica_id for e in a.engines if any(r.is_offline for r in e.finished)}) == 3
    c = _cluster(3, seed=8)
    c.run(300.0)
    assert [(o.ttft_s, o.replica) for o in c.chat_outcomes()] != [(t, r) for t, _, r in out_a]


def test_steps_are_timed_by_the_model_and_time_advances_by_them():
    cluster = _cluster(1, seed=1)
    cluster.run(300.0)
    e = cluster.engines[0]
    # The engine was busy exactly the sum of its step times, never two steps at once.
    rows = e._step_rows
    ends = [r["end_time_s"] for r in rows]
    assert ends == sorted(ends)
    starts = np.array(ends) - np.array([r["step_latency_ms"] for r in rows]) / 1000.0
    assert np.all(starts[1:] >= np.array(ends[:-1]) - 1e-9)
    assert e.counters.step_time_s_total == pytest.approx(sum(r["step_latency_ms"] for r in rows) / 1000.0)


def test_the_production_controller_runs_on_simulated_time(tmp_path):
    from orchestrator.config import EmulationConfig
    from orchestrator.control.controller import ControllerCore, MemoryCheckpoint

    slo = tmp_path / "slo.yaml"
    slo.write_text("models:\n  m:\n    ttft_p99_ms: 500\n    tpot_p99_ms: 30\n")

    roofline = EmulationConfig().roofline()
    engines = [SimEngine(f"r{i}", SimEngineConfig(max_num_seqs=64, num_gpu_blocks=20_000), roofline) for i in range(2)]
    core = ControllerCore(model_id="m", slo_path=str(slo), store=MemoryCheckpoint(), metrics=False, admission=lambda t: None)
    core.latency_model = roofline
    cluster = SimCluster(engines, core, seed=3)
    core.clock = lambda: cluster.now_s
    rng = np.random.default_rng(3)
    cluster.add_chat([ChatRequest(float(t), 64, 32) for t in np.cumsum(rng.exponential(0.5, 40))], offset_s=5.0)
    cluster.add_job(SimJob("job", [(256, 64)] * 5000, default_cap=4))
    cluster.run(20.0)
    # The controller decided on the simulated clock, replied with budgets, and set the jobs'
    # total: the job's allowance follows it (beyond its static cap of 4).
    assert core.last_decision is not None and core.last_decision_s == pytest.approx(20.0, abs=0.3)
    assert all(e.budget is not None and e.budget_valid_until_s > 19.0 for e in engines)
    assert cluster._total_budget is not None and cluster.jobs[0].allowed == cluster._total_budget > 4
    assert all(e.counters.num_fallback_steps < e.counters.num_steps_total for e in engines)
    assert sum(e.counters.num_offline_output_tokens_total for e in engines) > 1000
    assert all(o.ok for o in cluster.chat_outcomes(until_s=15.0))


def test_simulate_command_writes_bench_format_results(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from bench.commands import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "-c", "manifests/colocate-emulated.yaml", "--replicas", "2",
            "--duration-s", "8", "--rate", "2", "--policy", "colocate,static-8", "--ttft-p99-ms", "600",
            "--tpot-p99-ms", "50", "--num-offline-requests", "3000", "--controller-model", "oracle"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"]["simulated"] is True and doc["summary"]["engine"].startswith("simulated")
    assert set(doc["summary"]["policies"]) == {"colocate", "static-8"}
    row = doc["runs"]["colocate"][0]
    assert row["num_online"] == 16 and row["offline_tokens_per_s"] > 0
    assert (out / "latency_cdf.png").is_file() and (out / "summary.txt").is_file()
    # An existing results file is never overwritten; a wrong policy is a clear error.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad = CliRunner().invoke(app, [*args[:-10], "--out", str(tmp_path / "b"), "--policy", "fastest"])
    assert bad.exit_code == 2 and "unknown policy" in bad.output


def test_chat_waits_at_the_router_behind_a_full_replica():
    # Serve's max_ongoing_requests: a replica already holding 4 offline requests takes no more;
    # a chat request waits at the router until one finishes, and its client-side TTFT says so.
    e = SimEngine("r", SimEngineConfig(max_num_seqs=8, num_gpu_blocks=1000), FixedStep(10.0))
    e.override = OfflineBudget.flat(8, 512)
    cluster = SimCluster([e], controller=None, max_ongoing_requests=4)
    cluster.add_job(SimJob("job", [(16, 20)] * 8, default_cap=4))
    cluster.add_chat([ChatRequest(0.05, 16, 2)])
    cluster.run(10.0)
    chat = cluster.chat[0][1]
    assert cluster.max_router_queue >= 1
    # The first offline request ends after 1 prefill + 19 decode steps = 200 ms; chat gets in then.
    assert chat.arrival_s == pytest.approx(0.200, abs=1e-6) and chat.client_arrival_s == pytest.approx(0.05)
    outcome = cluster.chat_outcomes()[0]
    assert outcome.ttft_s == pytest.approx(chat.first_token_s - 0.05)
    assert outcome.ttft_s > 0.15
    assert cluster.jobs[0].done == 8


def test_length_ordering_runs_the_engines_guard():
    # One sequence slot: requests queue. Levels by predicted length put the short one first; the
    # guard (the engine's own WaitingGuard) promotes the long one once it waited 10x its service.
    from orchestrator.config import OrderConfig
    from orchestrator.engine.order import priority_level
    from orchestrator.request_class import RequestClass, vllm_priority

    cfg = OrderConfig(policy="sjf", predictor_path="unused", wait_factor=2.0, aging_octaves_per_service=0.0)
    e = SimEngine("r", SimEngineConfig(max_num_seqs=1, num_gpu_blocks=1000), FixedStep(10.0), order=cfg)
    e.override = OfflineBudget.flat(0, 0)

    def chat(name, arrival, out):
        return SimRequest(name, vllm_priority(RequestClass.ONLINE, priority_level(out, 1.0, cfg)), arrival, 8, out)

    first = chat("first", 0.0, 4)
    long, short = chat("long", 0.001, 200), chat("short", 0.002, 4)
    for r in (first, long, short):
        e.add_request(r)
    run_alone(e, until_s=100.0)
    assert short.first_token_s < long.first_token_s  # shortest predicted first
    assert all(r.finished_s is not None for r in (first, long, short))
    # Many short ones behind a long one: the guard lets the long one in before they all pass.
    e = SimEngine("r", SimEngineConfig(max_num_seqs=1, num_gpu_blocks=1000), FixedStep(10.0), order=cfg)
    e.override = OfflineBudget.flat(0, 0)
    long = chat("long", 0.0, 8)
    e.add_request(chat("head", 0.0, 30))
    e.add_request(long)
    shorts = [chat(f"s{i}", 0.0001 * (i + 1), 2) for i in range(200)]
    for r in shorts:
        e.add_request(r)
    run_alone(e, until_s=100.0)
    assert e.num_guard_promotions >= 1
    assert sum(1 for r in shorts if r.first_token_s < long.first_token_s) < 200


def test_srpt_in_the_simulator_runs_the_engines_limited_preemption():
    # One slot: a long request has just started when a short one arrives. sjf lets it finish
    # first; srpt preempts it (the engine's own LimitedPreemption pass), so the short one is
    # served first and the long one recomputes and finishes after it.
    from orchestrator.config import OrderConfig
    from orchestrator.engine.order import priority_level
    from orchestrator.request_class import RequestClass, vllm_priority

    def run(policy):
        cfg = OrderConfig(policy=policy, predictor_path="unused")
        e = SimEngine("r", SimEngineConfig(max_num_seqs=1, num_gpu_blocks=1000), FixedStep(10.0), order=cfg)
        e.override = OfflineBudget.flat(0, 0)
        long = SimRequest("long", vllm_priority(RequestClass.ONLINE, priority_level(400, 1.0, cfg)), 0.0, 8, 400)
        short = SimRequest("short", vllm_priority(RequestClass.ONLINE, priority_level(4, 1.0, cfg)), 0.05, 8, 4)
        e.add_request(long)
        t = 0.0
        while t < 0.05:
            t = e.start_step(t)
            e.finish_step()
        e.add_request(short)
        run_alone(e, until_s=100.0)
        return e, long, short

    e, long, short = run("sjf")
    assert short.first_token_s > long.finished_s
    e, long, short = run("srpt")
    assert e.num_chat_preempted == 1 and long.num_preemptions == 1
    assert short.finished_s < long.finished_s


def test_a_preempted_request_recomputes_before_it_emits_again():
    # 8-token prompt, 10 tokens out, 8 tokens per step. After 5 tokens it is preempted: vLLM
    # recomputes prompt + outputs (13 tokens: two chunks) and samples only after the second.
    e = SimEngine("r", SimEngineConfig(max_num_batched_tokens=8, num_gpu_blocks=100), FixedStep(10.0))
    e.override = OfflineBudget.flat(4, 64)
    r = SimRequest("o", OFFLINE_PRIORITY, 0.0, 8, 10)
    e.add_request(r)
    t = 0.0
    for _ in range(5):
        t = e.start_step(t)
        e.finish_step()
    assert r.num_output_tokens == 5
    e.preempt(r, t)
    assert r.num_computed_tokens == 0 and e.num_free_blocks() == 100
    run_alone(e, until_s=10.0)
    assert r.num_output_tokens == 10 and r.finished_s is not None
    assert e.counters.num_steps_total == 5 + 2 + 4
    assert e.counters.num_offline_output_tokens_total == 10


@pytest.mark.parametrize("routing", ["serve", "room"])
def test_offline_routing_by_room_sends_a_burst_where_the_budget_is(routing):
    # Two replicas, one whose budget leaves 1 offline slot and one with 8: a job's 9 requests go
    # by room to the roomy one (8 of 9) with `room`, and about evenly by queue length with `serve`.
    engines = [SimEngine(name, SimEngineConfig(max_num_seqs=16, num_gpu_blocks=1000), FixedStep(10.0))
               for name in ("tight", "roomy")]
    for e, seqs in zip(engines, (1, 8), strict=True):
        e.set_budget(OfflineBudget.flat(seqs, 512), valid_until_s=float("inf"))
    cluster = SimCluster(engines, controller=None, offline_routing=routing, seed=2)
    cluster.add_job(SimJob("job", [(16, 200)] * 9, default_cap=9), at_s=0.5)
    cluster.run(0.6)
    held = {e.replica_id: e.num_ongoing(offline=True) for e in engines}
    assert sum(held.values()) == 9
    if routing == "room":
        assert held == {"tight": 1, "roomy": 8}
    else:
        assert 2 <= held["tight"] <= 7
