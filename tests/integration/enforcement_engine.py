"""Drives a real vLLM engine through offline-only, chat-burst and controller-silent phases
with ColocateScheduler and a budget in its channel; prints the step rows of each phase (JSON)."""

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
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              max_num_batched_tokens=256, scheduling_policy="priority", enable_prefix_caching=False,
              scheduler_cls="orchestrator.engine.scheduler.ColocateScheduler")
    eng = llm.llm_engine
    # 0 online: 4 offline seqs, 512 tokens; 1+ online: 1 offline seq, 8 tokens.
    chan.write_budget(OfflineBudget((4, 1), (512, 8)), valid_for_s=600)
    off = SamplingParams(max_tokens=60, ignore_eos=True)
    on = SamplingParams(max_tokens=12, ignore_eos=True)
    phases = []
    def run(n, label):
        start = chan.num_steps()
        for _ in range(n):
            eng.step()
        rows, _ = chan.steps_since(start)
        c = rows_to_columns(rows)
        phases.append({"label": label, **{k: c[k].tolist() for k in ("num_offline_reqs", "num_online_reqs", "num_prefill_tokens", "num_decode_reqs")}})
    for i in range(6):
        eng.add_request(f"off{i}", {"prompt_token_ids": [5 + i] * 100}, off, priority=OFFLINE_PRIORITY)
    run(12, "offline only")
    for i in range(2):
        eng.add_request(f"on{i}", {"prompt_token_ids": [7 + i] * 50}, on, priority=0)
    run(14, "chat burst")
    run(6, "after burst")
    chan.write_budget(OfflineBudget((4, 1), (512, 8)), valid_for_s=-1)
    run(6, "controller silent")
    print("PHASES", json.dumps(phases))
    print("COUNTERS", json.dumps(chan.counters()))
    eng.engine_core.shutdown()
    chan.close(unlink=True)
