"""Drives a real vLLM engine (ColocateScheduler, length-aware ordering on) with one sequence slot:
requests queued at different ordering levels, then a long-waiting request among a stream of
short ones. Prints the finish orders and the engine's counters (JSON)."""

import json
import os
import sys

from orchestrator.config import OrderConfig
from orchestrator.engine.channel import EngineChannel
from orchestrator.names import ENV_ENGINE_CHANNEL, ENV_ENGINE_ORDER
from orchestrator.request_class import RequestClass, vllm_priority

if __name__ == "__main__":
    chan = EngineChannel.create()
    os.environ[ENV_ENGINE_CHANNEL] = str(chan.path)
    # wait_factor 1: a request of level 8 (at least 3 predicted tokens) is due after 3 steps waiting.
    # Aging off, so the guard is what moves it (aging is unit-tested on its own).
    os.environ[ENV_ENGINE_ORDER] = OrderConfig(policy="sjf", predictor_path="unused", wait_factor=1.0,
                                               max_wait_s=3600, aging_octaves_per_service=0).model_dump_json()
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=2048, max_num_seqs=1,
              max_num_batched_tokens=256, scheduling_policy="priority", enable_prefix_caching=False,
              scheduler_cls="orchestrator.engine.scheduler.ColocateScheduler")
    eng = llm.llm_engine
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def drain(order):
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    order.append(out.request_id)

    # 1. Ordering: a blocker holds the one slot; four requests wait at levels 30, 4, 17, 4.
    order = []
    eng.add_request("blocker", {"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()
    for name, level in (("l30", 30), ("l4a", 4), ("l17", 17), ("l4b", 4)):
        eng.add_request(name, {"prompt_token_ids": [6] * 20}, params,
                        priority=vllm_priority(RequestClass.ONLINE, level))
    drain(order)
    promotions_before = chan.counters()["num_guard_promotions"]
    # 2. Starvation guard: one level-8 request, then a level-1 request arriving at every finish.
    starve = []
    eng.add_request("blocker2", {"prompt_token_ids": [5] * 20}, params)
    eng.step()
    eng.add_request("long", {"prompt_token_ids": [7] * 20}, params, priority=vllm_priority(RequestClass.ONLINE, 8))
    n = 0
    while n < 12:
        eng.add_request(f"short{n}", {"prompt_token_ids": [8] * 20}, params,
                        priority=vllm_priority(RequestClass.ONLINE, 1))
        n += 1
        for _ in range(6):
            if not eng.has_unfinished_requests():
                break  # step() blocks on the engine core's output when nothing runs
            for out in eng.step():
                if out.finished:
                    starve.append(out.request_id)
    drain(starve)
    print("ORDER", json.dumps(order))
    print("STARVE", json.dumps(starve))
    print("PROMOTIONS", chan.counters()["num_guard_promotions"] - promotions_before)
    eng.engine_core.shutdown()
    chan.close(unlink=True)
