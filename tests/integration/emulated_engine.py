"""Drives a real vLLM engine (Colocate's scheduler, the emulated executor) through a chat burst
beside offline work; prints the replies' lengths, the engine process's CPU time per wall second
while it served, and where its step telemetry went (JSON after RESULT)."""

import json
import os
import resource
import sys
import time

from orchestrator.engine.budget import OfflineBudget
from orchestrator.engine.channel import EngineChannel
from orchestrator.engine.emulated import EXECUTOR_QUALNAME
from orchestrator.names import ENV_ENGINE_CHANNEL
from orchestrator.request_class import RequestClass, vllm_priority

if __name__ == "__main__":
    model, num_offline, num_chat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chan = EngineChannel.create(fallback=OfflineBudget.flat(num_offline, 4096))
    os.environ[ENV_ENGINE_CHANNEL] = str(chan.path)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=2048, max_num_seqs=64,
                      max_num_batched_tokens=512, scheduling_policy="priority",
                      scheduler_cls="orchestrator.engine.scheduler.ColocateScheduler",
                      distributed_executor_backend=EXECUTOR_QUALNAME)
    eng = LLMEngine.from_engine_args(args)
    chan.write_budget(OfflineBudget((num_offline, num_offline), (4096, 4096)), valid_for_s=600)
    lengths = {}
    for i in range(num_offline):
        eng.add_request(f"off{i}", {"prompt_token_ids": [11 + i % 50] * (300 + 7 * i)},
                        SamplingParams(max_tokens=120, ignore_eos=True), priority=vllm_priority(RequestClass.OFFLINE))
    # A chat request with EOS honoured: the emulated model never emits EOS, so it runs to max_tokens.
    for i in range(num_chat):
        eng.add_request(f"chat{i}", {"prompt_token_ids": [21 + i] * (100 + 40 * i)},
                        SamplingParams(max_tokens=40 + 10 * i), priority=vllm_priority(RequestClass.ONLINE))
    wall0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                lengths[out.request_id] = len(out.outputs[0].token_ids)
    wall = time.monotonic() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print("RESULT", json.dumps({"lengths": lengths, "wall_s": wall, "cpu_s": cpu_s,
                                "counters": chan.counters()}))
    eng.engine_core.shutdown()
    chan.close(unlink=True)
