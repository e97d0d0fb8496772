"""Drives a real vLLM engine whose KV cache is full of paused offline requests when a chat request
arrives; prints when the chat request got its first token and the engine's counters (JSON)."""

import json
import os
import sys

from orchestrator.engine.budget import OfflineBudget
from orchestrator.engine.channel import EngineChannel, rows_to_columns
from orchestrator.engine.enforce import OFFLINE_PRIORITY
from orchestrator.names import ENV_ENGINE_CHANNEL

if __name__ == "__main__":
    chan = EngineChannel.create(fallback=OfflineBudget.flat(2, 64))
    os.environ[ENV_ENGINE_CHANNEL] = str(chan.path)
    from vllm import LLM, SamplingParams
    # 20 blocks of 32 tokens (one reserved): three offline requests of 180-token prompts take 18.
    # "slots": the cache is large, but the three offline requests take every sequence slot.
    limit = {"max_num_seqs": 3} if sys.argv[2:] == ["slots"] else {"num_gpu_blocks_override": 20}
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_batched_tokens=256, scheduling_policy="priority", enable_prefix_caching=False,
              block_size=32, scheduler_cls="orchestrator.engine.scheduler.ColocateScheduler", **limit)
    eng = llm.llm_engine
    # No chat: 3 offline sequences; with chat: none (all paused, holding their KV).
    chan.write_budget(OfflineBudget((3, 0), (1024, 0)), valid_for_s=600)
    off = SamplingParams(max_tokens=300, ignore_eos=True)
    for i in range(3):
        eng.add_request(f"off{i}", {"prompt_token_ids": [5 + i] * 180}, off, priority=OFFLINE_PRIORITY)
    for _ in range(12):
        eng.step()
    rows, _ = chan.steps_since(0)
    usage_before = float(rows_to_columns(rows)["kv_cache_usage"][-1])
    eng.add_request("chat", {"prompt_token_ids": [7] * 100}, SamplingParams(max_tokens=8, ignore_eos=True), priority=0)
    first_token_step, done_step = None, None
    for step in range(1, 40):
        for out in eng.step():
            if out.request_id == "chat":
                if first_token_step is None and out.outputs[0].token_ids:
                    first_token_step = step
                if out.finished:
                    done_step = step
        if done_step:
            break
    print("RESULT", json.dumps({"usage_before": usage_before, "first_token_step": first_token_step,
                                "done_step": done_step, "counters": chan.counters()}))
    eng.engine_core.shutdown()
    chan.close(unlink=True)
