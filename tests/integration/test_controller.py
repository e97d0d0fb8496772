"""The controller on the real stack: SLO hot reload, status and metrics, and the throttle itself."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from openai import AsyncOpenAI

from bench.bench import BenchOptions
from orchestrator.control.policy import PolicyConfig
from orchestrator.engine.load import LATENCY_WINDOW_S
from profiler.workload import make_prompt
from tests.integration.conftest import ROOT, colocate_cmd, controller_in_force, start_stack

pytestmark = pytest.mark.integration


def cli(stack, *args, check=True):
    out = subprocess.run(colocate_cmd(*args), cwd=ROOT, env=stack["env"], capture_output=True, text=True,
                         timeout=120)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def controller_status(stack) -> dict:
    return json.loads(cli(stack, "status", "--json").stdout)["controller"]


def slo_of(stack) -> dict:
    return controller_status(stack)["slo"]


def slo_in_force(stack) -> dict:
    """The controller's targets, asked directly over a Ray connection: timing an SLO reload
    through `colocate status` would time a CLI process's start-up (10 s and more on a loaded
    host), not the reload."""
    return controller_in_force(stack)["slo"]


def wait_for(predicate, timeout_s: float, period_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    return None


def test_slo_edits_take_effect_within_two_seconds_and_bad_ones_are_rejected(stack):
    path = stack["slo_path"]
    original = path.read_text()
    try:
        slo_in_force(stack)  # connected before the edit
        path.write_text(original.replace("tpot_p99_ms: 60.0", "tpot_p99_ms: 75.0", 1))
        edited_at = time.monotonic()
        # The controller polls the file every tick (250 ms); live within 2 s, checked with slack.
        assert wait_for(lambda: slo_in_force(stack)["tpot_p99_ms"] == 75.0, timeout_s=6)
        assert time.monotonic() - edited_at < 6
        status = controller_in_force(stack)
        assert status["slo_error"] is None

        path.write_text(original.replace("tpot_p99_ms: 60.0", "tpot_p99_ms: -1", 1))
        error = wait_for(lambda: controller_in_force(stack)["slo_error"], timeout_s=6)
        assert "models.colocate-tiny.tpot_p99_ms" in error and "keeping the last good targets" in error
        assert slo_in_force(stack)["tpot_p99_ms"] == 75.0

        # The CLI validates before writing: a bad value never reaches the file.
        path.write_text(original)
        bad = cli(stack, "slo", "set", "-c", str(stack["config_path"]), "colocate-tiny.ttft_p99_ms=0", check=False)
        assert bad.returncode == 2 and "greater than 0" in bad.stderr
        assert "ttft_p99_ms: 1000.0" in path.read_text()
        good = cli(stack, "slo", "set", "-c", str(stack["config_path"]), "colocate-tiny.tpot_p99_ms=90")
        assert "models.colocate-tiny.tpot_p99_ms: 60.0 -> 90.0" in good.stdout
        assert wait_for(lambda: slo_in_force(stack)["tpot_p99_ms"] == 90.0, timeout_s=6)
        shown = cli(stack, "slo", "show", "-c", str(stack["config_path"]))
        assert "tpot_p99_ms: 90.0" in shown.stdout
    finally:
        path.write_text(original)
        wait_for(lambda: slo_in_force(stack)["tpot_p99_ms"] == 60.0, timeout_s=6)


def test_status_and_prometheus_show_budget_latency_and_throttle_per_replica(stack):
    status = wait_for(lambda: (s := controller_status(stack)) and s["replicas"] and s, timeout_s=10)
    (row,) = status["replicas"]
    for key in ("online_requests", "offline_budget_seqs", "offline_budget_tokens", "observed_ttft_p99_ms",
                "observed_tpot_p99_ms", "predicted_step_ms", "slo_tpot_p99_ms", "throttle"):
        assert key in row
    human = cli(stack, "status").stdout
    assert "controller:" in human and "TPOT p99" in human
    metrics_url = json.loads(cli(stack, "status", "--json").stdout)["metrics_url"]

    def scrape():
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        return text if "colocate_offline_budget_seqs" in text else None

    text = wait_for(scrape, timeout_s=30, period_s=2)
    assert text, "controller metrics never reached the Ray metrics port"
    assert "colocate_slo_tpot_p99_ms" in text and "colocate_throttle_scale" in text


# --- the throttle, end to end -------------------------------------------------------------------
# On the bench model (60M parameters, float32 on this CPU: ~30 ms a step for one sequence, ~150 ms
# for 28) the engine's step time is what chat feels, as on a GPU; the tiny test model's steps are
# so short that its latency is all serving overhead. Its stack runs with the latency model
# trained on the committed CPU profile of the same model.

CHAT_CONCURRENCY = 4
CHAT_TOKENS = 48
OFFLINE_CONCURRENCY = 24
OFFLINE_TOKENS = 96
REACTION_S = 6.0
# After chat stops, the replica's latency window and calibration steps still hold chat-time
# values for a few seconds, and a cut throttle scale grows back one step per hold. The test
# measures the recovered throughput, not the way back: after a 6 s wait CI once saw 45 offline
# tok/s against 61 before (the wait below is the worst case, from the scale's floor).
_POLICY = PolicyConfig()
RECOVERY_S = (LATENCY_WINDOW_S + math.ceil((1.0 - _POLICY.min_scale) / _POLICY.grow_step) * _POLICY.grow_hold_s
              + 2.0)  # two report periods' slack
"""p99 TPOT is measured over chat requests started this long after the step up: the engine cuts
offline work at the next step, the feedback loop over a few seconds of observed latency."""
SLO_TOLERANCE = BenchOptions().slo_tolerance
"""The test's TPOT target is this chat load's p99 alone, measured first on the same host, times
(1 + tolerance) (the bench's default SLO rule); no absolute time anywhere. A fixed target is a
statement about the host's speed: a loaded CI host ran the engine at half speed and chat alone
nearly broke a fixed 150 ms; a host 3-7x faster than this one measured chat alone at 33.5 ms p99,
so a 150 ms floor sat above even naive co-location (94.5 ms) and the test's premise failed.
By construction the naive phase breaks the target on any host: it runs OFFLINE_CONCURRENCY
offline decodes (and their prefills) in every chat step, against CHAT_CONCURRENCY chat decodes
alone, i.e. a decode batch 7x larger, and a CPU decode step grows with its batch (the bench
model: ~30 ms for 1 sequence, ~150 ms for 28 on this machine, 2.8x alone on the fast host)."""
BENCH_MODEL = ROOT / ".colocate" / "models" / "tiny-bench"
CPU_PROFILE = ROOT / "profiler" / "data" / "cpu-bench-profile.parquet"


@pytest.fixture(scope="module")
def bench_stack(tmp_path_factory):
    from latency_model.model import train
    from latency_model.schema import read_steps

    work = tmp_path_factory.mktemp("bench-stack")
    model, _ = train(read_steps(CPU_PROFILE))
    model.save(work / "latency-model")
    yield from start_stack(
        work,
        model={"id": "colocate-bench", "source": str(BENCH_MODEL), "build_tiny": "bench"},
        engine_kwargs={"max_model_len": 1024, "max_num_seqs": 32, "max_num_batched_tokens": 512},
        controller={"model_path": str(work / "latency-model")},
    )


async def _offline_backlog(client, model, stop: asyncio.Event, tokens_at: list[tuple[float, int]]) -> None:
    """OFFLINE_CONCURRENCY offline requests in flight; records (arrival time, 1) for every output
    token. Streamed, so a window's rate counts the tokens decoded in it: counted at completion,
    24 requests that a chat phase paused together finish together, and a 15 s window after it
    saw a wave or a gap (CI once measured 64 tok/s after against 88 before while the engine ran
    the same offline tokens per step)."""
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": make_prompt(200, 7000 + 100 * w + i)}],
                    # Lengths vary so the backlog's requests do not finish (and prefill) in waves.
                    max_tokens=OFFLINE_TOKENS // 2 + (37 * w + 53 * i) % OFFLINE_TOKENS, stream=True,
                    extra_body={"ignore_eos": True, "request_class": "offline"})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason is None:
                        tokens_at.append((time.monotonic(), 1))
            except Exception:  # noqa: BLE001 - the backlog keeps going; chat results are what count
                await asyncio.sleep(0.2)

    await asyncio.gather(*(worker(w) for w in range(OFFLINE_CONCURRENCY)))


async def _chat_phase(client, model, duration_s: float, settle_s: float = 0.0) -> list[float]:
    """CHAT_CONCURRENCY users chatting back to back for duration_s; TPOT (ms) of each request
    started at least settle_s after the step up (the time the SLO gives the controller)."""
    tpots: list[float] = []
    begin = time.monotonic()
    end = begin + duration_s

    async def user(u: int) -> None:
        # Each user keeps going past duration_s until one of its requests started after the
        # settling time has been measured: on a slow host (one core) a naive-phase request took
        # longer than the whole phase, and the phase measured nothing.
        i = 0
        measured = 0
        while time.monotonic() < end or measured == 0:
            i += 1
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": make_prompt(64, 100 * u + i)}],
                max_tokens=CHAT_TOKENS, stream=True, extra_body={"ignore_eos": True, "request_class": "online"})
            started = time.monotonic()
            stamps = [time.monotonic() async for c in stream if c.choices and c.choices[0].finish_reason is None]
            if len(stamps) > 1 and started - begin >= settle_s:
                tpots.append((stamps[-1] - stamps[0]) * 1000.0 / (len(stamps) - 1))
                measured += 1

    await asyncio.gather(*(user(u) for u in range(CHAT_CONCURRENCY)))
    return tpots


def _rate(done: list[tuple[float, int]], start: float, end: float) -> float:
    return sum(n for t, n in done if start <= t < end) / (end - start)


def _offline_tokens(stack) -> tuple[float, dict]:
    """(time, engine's cumulative offline tokens) and the replica's controller row."""
    row = controller_status(stack)["replicas"][0]
    return time.monotonic(), row


def _settle_calibration(stack, *, tolerance: float = 0.1, period_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Wait until the controller's model calibration (observed / predicted step latency) holds
    within `tolerance` over one period. The no-chat budget follows it, and on a slow host (CI;
    one core) it kept rising for a minute as the backlog's contexts grew: a 'before' window
    taken on the way measured 38 offline tok/s against 15 'after', both correct for their
    calibration (2.8 on CI, to the clamp of 4 on one core). Before and after are compared at
    a settled calibration; asked directly, so no CLI process starts beside the engine."""
    deadline = time.monotonic() + timeout_s
    prev = None
    while time.monotonic() < deadline:
        rows = controller_in_force(stack).get("replicas") or []
        value = rows[0].get("model_calibration") if rows else None
        if value is not None and prev is not None and abs(value - prev) <= tolerance * prev:
            return
        prev = value
        time.sleep(period_s)


def test_a_chat_step_up_makes_the_controller_cut_offline_work_and_it_recovers_after(bench_stack):
    """Standing offline backlog; chat steps up from nothing to CHAT_CONCURRENCY users and back.
    With the controller, offline work is cut while chat runs, chat p99 TPOT returns under the SLO,
    and offline throughput recovers when chat stops. The same chat step with the controller's
    policy switched off (budget pinned unlimited: naive co-location) breaks the SLO."""
    stack = bench_stack
    # manifests/slo.yaml keeps 35% of the bench model's targets as headroom: the latency model was
    # profiled on a bare engine, and under serving on 2 cores chat prefill steps and the serving
    # path outside the engine take about a third of the TPOT target.
    assert wait_for(lambda: slo_of(stack)["headroom"] == 0.35, timeout_s=10)
    model = stack["model"]
    rows: dict[str, tuple[float, dict]] = {}
    offline_tokens_at: list[tuple[float, int]] = []  # offline output tokens: (arrival time, 1)
    slo_tpot_ms = 0.0
    alone: list[float] = []

    async def sample(label: str) -> None:
        rows[label] = await asyncio.to_thread(_offline_tokens, stack)

    async def run():
        async with AsyncOpenAI(base_url=stack["endpoint"], api_key="unused", max_retries=0, timeout=300) as client:
            return await phases(client)

    async def phases(client):
        nonlocal slo_tpot_ms
        alone.extend(await _chat_phase(client, model, 20, settle_s=2.0))
        slo_tpot_ms = round(float(np.percentile(alone, 99)) * (1.0 + SLO_TOLERANCE), 1)
        await asyncio.to_thread(cli, stack, "slo", "set", "-c", str(stack["config_path"]),
                                f"{model}.tpot_p99_ms={slo_tpot_ms}")
        assert await asyncio.to_thread(wait_for, lambda: slo_of(stack)["tpot_p99_ms"] == slo_tpot_ms, 10)
        stop = asyncio.Event()
        backlog = asyncio.create_task(_offline_backlog(client, model, stop, offline_tokens_at))
        await asyncio.sleep(25)  # the backlog's first prefill wave passes; the no-chat budget fills
        await asyncio.to_thread(_settle_calibration, stack)
        await sample("before_start")
        await asyncio.sleep(15)
        await sample("before_end")
        rows["during_start"] = rows["before_end"]
        # No status calls while chat runs: each one is a Ray driver process starting on the same
        # two cores, and the delay it adds to the chat stream is not the engine's doing.
        controlled = await _chat_phase(client, model, 30, settle_s=REACTION_S)
        await sample("during_end")
        await asyncio.sleep(RECOVERY_S)
        await asyncio.to_thread(_settle_calibration, stack)
        await sample("after_start")
        await asyncio.sleep(15)
        await sample("after_end")
        await asyncio.to_thread(cli, stack, "override", "--max-offline-seqs", "100000", "--max-offline-tokens", "100000")
        await asyncio.sleep(6)
        naive = await _chat_phase(client, model, 30, settle_s=REACTION_S)
        stop.set()
        await backlog
        return controlled, naive

    original_slo = stack["slo_path"].read_text()
    try:
        controlled, naive = asyncio.run(run())
    finally:
        cli(stack, "override", "--clear", check=False)
        stack["slo_path"].write_text(original_slo)

    def rate(phase: str) -> float:
        """The batch's throughput: offline output tokens streamed in the phase (the engine's token
        counter also counts prompt tokens, which come in waves as requests start)."""
        return _rate(offline_tokens_at, rows[f"{phase}_start"][0], rows[f"{phase}_end"][0])

    def per_step(phase: str) -> float:
        """Offline tokens the engine ran per step: the work the budget admits into each step."""
        (_, r0), (_, r1) = rows[f"{phase}_start"], rows[f"{phase}_end"]
        steps = r1["num_steps_total"] - r0["num_steps_total"]
        return (r1["num_offline_tokens_total"] - r0["num_offline_tokens_total"]) / max(steps, 1)

    naive_p99 = float(np.percentile(naive, 99))
    controlled_p99 = float(np.percentile(controlled, 99))
    before, during, after = rate("before"), rate("during"), rate("after")
    step_before, step_during, step_after = per_step("before"), per_step("during"), per_step("after")
    budget_before = rows["before_end"][1]["offline_budget_tokens"]
    budget_during = rows["during_end"][1]["offline_budget_tokens"]
    report = (f"SLO TPOT p99 {slo_tpot_ms} ms (chat alone p99 {np.percentile(alone, 99):.1f} ms, "
              f"{len(alone)} requests); chat p99 TPOT naive {naive_p99:.1f} ms ({len(naive)} requests), "
              f"controlled {controlled_p99:.1f} ms ({len(controlled)}); offline output tok/s before chat {before:.0f}, "
              f"during {during:.0f}, after {after:.0f}; offline tokens per step {step_before:.1f} / "
              f"{step_during:.1f} / {step_after:.1f}; budget (seqs/tokens per step) before "
              f"{rows['before_end'][1]['offline_budget_seqs']}/{budget_before}, during "
              f"{rows['during_end'][1]['offline_budget_seqs']}/{budget_during}, after "
              f"{rows['after_start'][1]['offline_budget_seqs']}/{rows['after_start'][1]['offline_budget_tokens']} -> "
              f"{rows['after_end'][1]['offline_budget_seqs']}/{rows['after_end'][1]['offline_budget_tokens']}; "
              f"calibration before {rows['before_end'][1].get('model_calibration')}, after "
              f"{rows['after_start'][1].get('model_calibration')} -> "
              f"{rows['after_end'][1].get('model_calibration')} (band {rows['after_end'][1].get('target_band')}); "
              f"throttle scale during "
              f"{rows['during_end'][1].get('throttle_scale')}, after {rows['after_start'][1].get('throttle_scale')}"
              f" -> {rows['after_end'][1].get('throttle_scale')}; model calibration "
              f"{rows['during_end'][1].get('model_calibration')}; headroom {rows['during_end'][1].get('headroom')}, "
              f"probe {rows['during_end'][1].get('probe_tpot')}; model "
              f"{controller_status(stack).get('latency_model_status')}")
    print(report)
    # The premise, true by construction (see SLO_TOLERANCE): without the controller this load
    # breaks the target measured on this very host.
    assert naive_p99 > slo_tpot_ms, report
    assert controlled_p99 <= slo_tpot_ms, report
    # The cut: the engine admits less offline work into each step while chat runs (counted by the
    # engine itself; a status sample of the budget falls wherever the chat count is). (Offline tokens
    # per second need not fall as far: the steps get shorter once they carry no long prefill.)
    assert step_during < 0.8 * step_before, report
    # The recovery: offline work per step and throughput come back once chat stops. The feedback
    # gives back all it cut; what the model allows may have moved meanwhile: on the bench model's
    # flat step curve a calibration 5% higher than before the chat (a busier CI host) halves the
    # no-chat budget (24 -> 12 sequences, CI), which is the model following the host, not a
    # recovery that failed. Then the throughput is held to the budget the model gives now (a step
    # with fewer sequences is no longer, so output tokens/s fall at most in their proportion).
    assert step_after > step_during, report
    assert rows["after_end"][1]["throttle_scale"] == 1.0, report

    def budget(label: str) -> tuple[int, int]:
        return rows[label][1]["offline_budget_seqs"], rows[label][1]["offline_budget_tokens"]

    # Excused only where the calibration rose by more than the band that holds the tables (a
    # smaller move leaves them as they were), and by half the budget at most: a 5% move on the
    # flat curve halves it, no more.
    band = rows["after_end"][1].get("target_band") or 0.0
    slower_host = (budget("after_end") < budget("before_end")
                   and rows["after_end"][1]["model_calibration"] > (1.0 + band) * rows["before_end"][1]["model_calibration"])
    share = max(budget("after_end")[0] / max(budget("before_end")[0], 1), 0.5) if slower_host else 1.0
    # Recovery is held on the offline work the engine admits per step, the controller's part;
    # tokens per second also follow the host's speed, which moves between the windows on a shared
    # host (seen: 72.0 and 70.3 offline tokens per step before and after the chat, the budget
    # 24/128 throughout, and 303 against 223 tok/s: the same steps ran a quarter slower).
    assert step_after >= 0.8 * step_before * share, report
    assert after >= 0.5 * before * share, report  # and the batch runs again at a rate of its order
