import asyncio
import json

import numpy as np
import pytest

from jobs.formats import read_jsonl
from profiler.workload import (
    ChatResult,
    RequestSpec,
    load_chat_trace,
    run_chat_load,
    summarize_chat,
    write_batch_input,
)


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    # arrivals at 0, 1, 3, 6, 10 s: bursty, mean gap 2.5 s
    for i, t in enumerate([0, 1, 3, 6, 10]):
        rows.append(f"2023-11-16 18:15:{t:02d}.0000000,{1000 + i},{200 + i}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_chat_trace_is_scaled_to_the_target_rate_keeping_its_shape(trace):
    specs = load_chat_trace(trace, rate_per_s=2.0, duration_s=2.5, length_scale=0.1,
                            max_prompt_tokens=90, max_output_tokens=64)
    arrivals = np.array([s.arrival_s for s in specs])
    assert len(specs) == 5
    # 5 requests at 2/s span 2.5 s in all, the gaps keep their 1:2:3:4 ratio
    gaps = np.diff(arrivals)
    np.testing.assert_allclose(gaps / gaps[0], [1, 2, 3, 4])
    np.testing.assert_allclose(arrivals[-1] * 5 / 4, 2.5)
    assert [s.num_prompt_tokens for s in specs] == [90, 90, 90, 90, 90]  # 100 clipped to context
    assert [s.num_output_tokens for s in specs] == [20, 20, 20, 20, 20]


def test_chat_trace_rejects_wrong_columns_and_short_traces(tmp_path, trace):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_chat_trace(bad, rate_per_s=1, duration_s=1, length_scale=1, max_prompt_tokens=1, max_output_tokens=1)
    with pytest.raises(ValueError, match="cannot take 10"):
        load_chat_trace(trace, rate_per_s=1, duration_s=10, length_scale=1, max_prompt_tokens=1, max_output_tokens=1)


def test_batch_input_written_for_specs_parses_back(tmp_path):
    path = write_batch_input([RequestSpec(0, 50, 7), RequestSpec(0, 20, 3)], tmp_path / "in.jsonl", "m")
    items, errors = read_jsonl(path)
    assert not errors and [i.body["max_tokens"] for i in items] == [7, 3]
    assert json.loads(path.read_text().splitlines()[0])["body"]["model"] == "m"


def test_summary_percentiles_ignore_failed_requests():
    results = [ChatResult(0, 0.1 * i, 0.01 * i, 10, True) for i in range(1, 101)]
    results.append(ChatResult(0, None, None, 0, False, "APIConnectionError: boom"))
    s = summarize_chat(results)
    assert s["num_requests"] == 101 and s["num_ok"] == 100
    assert s["ttft_p50_ms"] == pytest.approx(5050.0)
    assert s["errors"] == ["APIConnectionError: boom"]


def _sent_prompts(monkeypatch, specs, prompt_tag):
    import openai

    sent = []

    class EmptyStream:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise StopAsyncIteration

    class FakeClient:
        def __init__(self, **_):
            self.chat = self.completions = self

        async def __aenter__(self):
            return self

        async def __aexit__(self, *_):
            return None

        async def create(self, **kw):
            sent.append(kw["messages"][0]["content"])
            return EmptyStream()

    monkeypatch.setattr(openai, "AsyncOpenAI", FakeClient)
    asyncio.run(run_chat_load("http://127.0.0.1:1/v1", "m", specs, prompt_tag=prompt_tag))
    return sent


def test_replays_share_arrivals_and_lengths_but_not_prompt_text(monkeypatch):
    # vLLM's prefix cache would serve a replay of the same prompts without their prefill.
    specs = [RequestSpec(0, 60, 5), RequestSpec(0, 60, 5), RequestSpec(0, 30, 5)]
    first = _sent_prompts(monkeypatch, specs, "run1")
    assert first == _sent_prompts(monkeypatch, specs, "run1")  # reproducible
    second = _sent_prompts(monkeypatch, specs, "run2")
    assert [len(p.split()) for p in first] == [len(p.split()) for p in second]
    # no shared leading block (16 tokens) between any two prompts of the two replays
    heads = {tuple(p.split()[:16]) for p in first + second}
    assert len(heads) == 6


def test_batch_jobs_with_different_prefixes_get_different_prompts(tmp_path):
    specs = [RequestSpec(0, 50, 7)] * 2
    a = [i.body["messages"][0]["content"] for i in read_jsonl(write_batch_input(specs, tmp_path / "a.jsonl", "m", "a"))[0]]
    b = [i.body["messages"][0]["content"] for i in read_jsonl(write_batch_input(specs, tmp_path / "b.jsonl", "m", "b"))[0]]
    assert len(set(a + b)) == 4
