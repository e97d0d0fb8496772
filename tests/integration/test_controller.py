"""The controller on the real stack: SLO hot reload, status and metrics, and the throttle itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from openai import AsyncOpenAI

from orchestrator.workload import make_prompt
from tests.integration.conftest import ROOT, colocate_cmd

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
        path.write_text(original.replace("tpot_p99_ms: 60.0", "tpot_p99_ms: 75.0", 1))
        edited_at = time.monotonic()
        # `colocate status` itself takes ~1 s to start; the controller polls the file every tick.
        assert wait_for(lambda: slo_of(stack)["tpot_p99_ms"] == 75.0, timeout_s=6)
        assert time.monotonic() - edited_at < 6
        status = controller_status(stack)
        assert status["slo_error"] is None

        path.write_text(original.replace("tpot_p99_ms: 60.0", "tpot_p99_ms: -1", 1))
        error = wait_for(lambda: controller_status(stack)["slo_error"], timeout_s=6)
        assert "models.colocate-tiny.tpot_p99_ms" in error and "keeping the last good targets" in error
        assert slo_of(stack)["tpot_p99_ms"] == 75.0

        # The CLI validates before writing: a bad value never reaches the file.
        path.write_text(original)
        bad = cli(stack, "slo", "set", "-c", str(stack["config_path"]), "colocate-tiny.ttft_p99_ms=0", check=False)
        assert bad.returncode == 2 and "greater than 0" in bad.stderr
        assert "ttft_p99_ms: 1000.0" in path.read_text()
        good = cli(stack, "slo", "set", "-c", str(stack["config_path"]), "colocate-tiny.tpot_p99_ms=90")
        assert "models.colocate-tiny.tpot_p99_ms: 60.0 -> 90.0" in good.stdout
        assert wait_for(lambda: slo_of(stack)["tpot_p99_ms"] == 90.0, timeout_s=6)
        shown = cli(stack, "slo", "show", "-c", str(stack["config_path"]))
        assert "tpot_p99_ms: 90.0" in shown.stdout
    finally:
        path.write_text(original)
        wait_for(lambda: slo_of(stack)["tpot_p99_ms"] == 60.0, timeout_s=6)


def test_status_and_prometheus_show_budget_latency_and_throttle_per_replica(stack):
    status = wait_for(lambda: (s := controller_status(stack)) and s["replicas"] and s, timeout_s=10)
    (row,) = status["replicas"]
    for key in ("online_requests", "offline_budget_seqs", "offline_budget_tokens", "observed_ttft_p99_ms",
                "observed_tpot_p99_ms", "predicted_step_p99_ms", "slo_tpot_p99_ms", "throttle"):
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

CHAT_CONCURRENCY = 4
CHAT_TOKENS = 48
OFFLINE_CONCURRENCY = 24
SLO_TPOT_MS = 40.0


async def _offline_backlog(client, model, stop: asyncio.Event, tokens_at: list[float]) -> None:
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": make_prompt(200, 7000 + 100 * w + i)}],
                    max_tokens=256, stream=True, extra_body={"ignore_eos": True, "request_class": "offline"})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason is None:
                        tokens_at.append(time.monotonic())
                    if stop.is_set():
                        await stream.close()
                        return
            except Exception:  # noqa: BLE001 - the backlog keeps going; chat results are what count
                await asyncio.sleep(0.2)

    await asyncio.gather(*(worker(w) for w in range(OFFLINE_CONCURRENCY)))


async def _chat_phase(client, model, duration_s: float) -> list[float]:
    """CHAT_CONCURRENCY users chatting back to back for duration_s; TPOT (ms) per request."""
    tpots: list[float] = []
    end = time.monotonic() + duration_s

    async def user(u: int) -> None:
        i = 0
        while time.monotonic() < end:
            i += 1
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": make_prompt(64, 100 * u + i)}],
                max_tokens=CHAT_TOKENS, stream=True, extra_body={"ignore_eos": True, "request_class": "online"})
            stamps = [time.monotonic() async for c in stream if c.choices and c.choices[0].finish_reason is None]
            if len(stamps) > 1:
                tpots.append((stamps[-1] - stamps[0]) * 1000.0 / (len(stamps) - 1))

    await asyncio.gather(*(user(u) for u in range(CHAT_CONCURRENCY)))
    return tpots


def _rate(stamps: list[float], start: float, end: float) -> float:
    return sum(1 for t in stamps if start <= t < end) / (end - start)


def test_a_chat_step_up_makes_the_controller_cut_offline_work_and_it_recovers_after(stack):
    """Standing offline backlog; chat steps up from nothing to CHAT_CONCURRENCY users. Without
    the controller's policy (budget pinned unlimited: naive co-location) chat p99 TPOT breaks the
    SLO; with it, p99 TPOT is back under the SLO; when chat stops, offline throughput recovers."""
    slo_tpot_ms = SLO_TPOT_MS
    path = stack["slo_path"]
    original = path.read_text()
    path.write_text(original.replace("tpot_p99_ms: 60.0", f"tpot_p99_ms: {slo_tpot_ms}", 1))
    assert wait_for(lambda: slo_of(stack)["tpot_p99_ms"] == slo_tpot_ms, timeout_s=6)
    client = AsyncOpenAI(base_url=stack["endpoint"], api_key="unused", max_retries=0, timeout=300)
    model = stack["model"]
    marks: dict[str, float] = {}
    statuses: list[dict] = []

    async def run():
        stop = asyncio.Event()
        tokens_at: list[float] = []
        backlog = asyncio.create_task(_offline_backlog(client, model, stop, tokens_at))
        await asyncio.to_thread(cli, stack, "override", "--max-offline-seqs", "100000", "--max-offline-tokens", "100000")
        await asyncio.sleep(6)
        marks["naive_start"] = time.monotonic()
        naive = await _chat_phase(client, model, 20)
        marks["naive_end"] = time.monotonic()
        await asyncio.to_thread(cli, stack, "override", "--clear")
        await asyncio.sleep(6)
        marks["controlled_start"] = time.monotonic()
        chat_task = asyncio.create_task(_chat_phase(client, model, 20))
        while not chat_task.done():
            statuses.append(await asyncio.to_thread(controller_status, stack))
            await asyncio.sleep(2)
        controlled = await chat_task
        marks["controlled_end"] = time.monotonic()
        await asyncio.sleep(12)
        marks["after_end"] = time.monotonic()
        after_status = await asyncio.to_thread(controller_status, stack)
        stop.set()
        await backlog
        return naive, controlled, tokens_at, after_status

    try:
        naive, controlled, tokens_at, after_status = asyncio.run(run())
    finally:
        path.write_text(original)
        cli(stack, "override", "--clear", check=False)
    naive_p99 = float(np.percentile(naive, 99))
    controlled_p99 = float(np.percentile(controlled, 99))
    controlled_rate = _rate(tokens_at, marks["controlled_start"], marks["controlled_end"])
    # Recovery: the last 6 s after chat stopped (the budget grows back by steps, not at once).
    recovered_rate = _rate(tokens_at, marks["after_end"] - 6, marks["after_end"])
    report = (f"SLO TPOT p99 {slo_tpot_ms} ms; naive p99 {naive_p99:.1f} ms ({len(naive)} requests); controlled "
              f"p99 {controlled_p99:.1f} ms ({len(controlled)}); offline tok/s during controlled chat "
              f"{controlled_rate:.0f}, after {recovered_rate:.0f}")
    print(report)
    assert naive_p99 > slo_tpot_ms, report
    assert controlled_p99 <= slo_tpot_ms, report
    assert any(s["replicas"] and s["replicas"][0]["throttle"] != "open" for s in statuses), statuses
    assert recovered_rate > 1.5 * controlled_rate, report
    assert after_status["replicas"][0]["offline_budget_seqs"] > min(
        s["replicas"][0]["offline_budget_seqs"] for s in statuses if s["replicas"]), report
