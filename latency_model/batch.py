"""The step aggregates of `latency_model.schema` from a step's scheduled requests: one function
for the engine's telemetry (which times steps) and the emulated executor (which models them), so
a modelled step and its measurement describe the batch the same way."""

from __future__ import annotations

from collections.abc import Iterable


def step_aggregates(requests: Iterable[tuple[int, int, int]]) -> dict[str, float]:
    """Aggregates of one step from (context tokens before the step, tokens scheduled, prompt
    tokens) per scheduled request. A request whose context is short of its prompt runs a
    prefill chunk; otherwise it decodes (one token; a recompute after preemption counts as
    prefill until its prompt is back)."""
    num_prefill_tokens = num_prefill_reqs = prefill_ctx = num_decode = decode_ctx = max_decode_ctx = 0
    attention2 = 0.0
    for context, num_tokens, num_prompt in requests:
        if context < num_prompt:
            num_prefill_reqs += 1
            num_prefill_tokens += num_tokens
            prefill_ctx += context
            attention2 += num_tokens * (context + num_tokens / 2)
        else:
            num_decode += 1
            decode_ctx += context
            max_decode_ctx = max(max_decode_ctx, context)
    return {
        "num_prefill_tokens": num_prefill_tokens,
        "num_prefill_reqs": num_prefill_reqs,
        "prefill_context_tokens": prefill_ctx,
        "prefill_attention_tokens2": attention2,
        "num_decode_reqs": num_decode,
        "decode_context_tokens": decode_ctx,
        "max_decode_context_tokens": max_decode_ctx,
    }


def emits_token(context: int, num_tokens: int, num_held: int) -> bool:
    """A request yields a token when this step's tokens reach the end of what it holds (prompt
    plus tokens generated so far): a decode, or the chunk that completes a (re)computed prompt."""
    return context + num_tokens >= num_held


def offline_counts(requests: Iterable[tuple[int, int, int, int, bool]]) -> dict[str, int]:
    """The offline class's share of a step from (context before the step, tokens scheduled,
    prompt tokens, tokens held before a token is sampled, offline?) per scheduled request:
    requests, tokens, prompt tokens among them, and output tokens (`emits_token`). One rule for
    the engine's telemetry and the simulator, whose counters the bench reads alike."""
    num_reqs = num_tokens = num_prompt_tokens = num_output = 0
    for context, n, num_prompt, num_held, offline in requests:
        if not offline:
            continue
        num_reqs += 1
        num_tokens += n
        num_prompt_tokens += max(0, min(n, num_prompt - context))
        num_output += 1 if emits_token(context, n, num_held) else 0
    return {"num_offline_reqs": num_reqs, "num_offline_tokens": num_tokens,
            "num_offline_prompt_tokens": num_prompt_tokens, "num_offline_output_tokens": num_output}
