"""Drives a real vLLM engine (ColocateScheduler, length-aware ordering with limited preemption on)
with one sequence slot: requests queued at different ordering levels, a long-waiting request
among a stream of short ones, then a short request arriving while a long one has just started
(preempted for it) and while another is well into its run (left to finish). Prints the finish
orders and the engine's counters (JSON)."""

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
    os.environ[ENV_ENGINE_ORDER] = OrderConfig(policy="srpt", predictor_path="unused", wait_factor=1.0,
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
    # 3. Limited preemption: a request predicted at ~1,000 tokens (level 40) has the slot and
    # has produced a token or two when one predicted at 1 token (level 4) arrives: preempted for
    # it. Then one predicted at 31 tokens (level 20) is 12 tokens in (past a quarter of its
    # prediction) when another short one arrives: left to finish.
    srpt = []

    def short_arrives_during(name, level, steps_in, short, token):
        """A request at `level` runs alone for `steps_in` steps, then a level-4 one arrives; returns
        how many chat requests the engine preempted until both finished."""
        before = chan.counters()["num_chat_preempted_total"]
        eng.add_request(name, {"prompt_token_ids": [token] * 20}, SamplingParams(max_tokens=24, ignore_eos=True),
                        priority=vllm_priority(RequestClass.ONLINE, level))
        for _ in range(steps_in):
            eng.step()
        eng.add_request(short, {"prompt_token_ids": [token + 1] * 20}, params,
                        priority=vllm_priority(RequestClass.ONLINE, 4))
        drain(srpt)
        return chan.counters()["num_chat_preempted_total"] - before

    early_preempted = short_arrives_during("early", 40, 3, "quick", 9)
    late_preempted = short_arrives_during("late", 20, 14, "quick2", 11)
    print("SRPT", json.dumps({"order": srpt, "early_preempted": early_preempted, "late_preempted": late_preempted}))
    print("ORDER", json.dumps(order))
    print("STARVE", json.dumps(starve))
    print("PROMOTIONS", chan.counters()["num_guard_promotions"] - promotions_before)
    eng.engine_core.shutdown()
    chan.close(unlink=True)
