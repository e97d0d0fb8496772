"""The emulated engine: vLLM with its forward pass replaced by a modelled wait.

vLLM's own extension point for where a model runs is the executor class
(`distributed_executor_backend` accepts a class or its qualified name). `EmulatedExecutor` is one:
the engine core, its scheduler (ours, with the per-step budget and telemetry), the KV cache
manager, prefix caching, chunked prefill, preemption, the front end and Ray Serve LLM are vLLM's
and run unchanged. Only `execute_model` differs: it computes the step's batch aggregates from the
scheduler output, waits for the time the roofline model gives that batch
(`latency_model.roofline`), and returns one token id per request that completes a token this
step (a decode, or the prefill chunk that ends a prompt), as the model runner would. No weights
are loaded and no tensors allocated: the model directory gives vLLM its tokenizer and config.

The KV cache has the emulated GPU's capacity (`EmulationConfig.kv_cache_tokens`, or what its
memory leaves beside the weights), expressed in blocks of the served config's layer shape, so
vLLM's block accounting, admission and preemption act at GPU scale.

Tokens are drawn from the vocabulary without its special ids: an emulated model never ends a
reply on its own; replies end at `max_tokens` or a stop string, as a trace's recorded output
length asks. EOS handling itself is vLLM's (the scheduler checks every token).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from latency_model.batch import emits_token, step_aggregates
from orchestrator.compat.vllm_api import (
    Executor,
    emulated_kv_cache_spec,
    model_runner_output,
    scheduled_requests,
)
from orchestrator.config import EmulationConfig
from orchestrator.names import EMULATED_EXECUTOR as EXECUTOR_QUALNAME  # noqa: F401 - re-exported
from orchestrator.names import ENV_EMULATION

log = logging.getLogger(__name__)

LATENESS_GAIN = 0.2
"""Share of each step's measured lateness folded into the next steps' early aim."""
MAX_LATENESS_SHARE = 0.5
"""The early aim never exceeds this share of a step (a stall must not make steps vanish)."""
KV_CACHE_LAYOUT = "LBNHC"
"""Any layout name vLLM knows: nothing is allocated, the engine core only records it."""


def load_emulation_config() -> EmulationConfig:
    raw = os.environ.get(ENV_EMULATION)
    return EmulationConfig.model_validate_json(raw) if raw else EmulationConfig()


class EmulatedExecutor(Executor):
    uses_ray = False
    supports_pp = False

    def _init_executor(self) -> None:
        self.emulation = load_emulation_config()
        self.latency = self.emulation.roofline()
        kv_tokens = self.emulation.kv_cache_tokens or self.latency.kv_cache_tokens(self.emulation.gpu_memory_utilization)
        block_size = self.cache_config.block_size
        self.num_blocks = max(1, kv_tokens // block_size)
        if self.cache_config.num_gpu_blocks_override is None:
            self.cache_config.num_gpu_blocks_override = self.num_blocks
        else:
            self.num_blocks = self.cache_config.num_gpu_blocks_override
        self._specs = emulated_kv_cache_spec(self.model_config, self.parallel_config, block_size)
        vocab = self.model_config.get_vocab_size()
        special = _special_token_ids(self.model_config)
        self._token_ids = np.array([t for t in range(vocab) if t not in special], dtype=np.int64)
        self._rng = np.random.default_rng(self.emulation.seed)
        self._prompt_len: dict[str, int] = {}
        self.num_steps = 0
        self._late_s = 0.0
        log.info("colocate: emulated engine, %s on %s, %d KV blocks of %d tokens (%d tokens)",
                 self.emulation.model_shape, self.emulation.gpu, self.num_blocks, block_size,
                 self.num_blocks * block_size)

    # --- the model: the one method that differs from a real executor ---------------------------
    def execute_model(self, scheduler_output, non_block: bool = False):
        started = time.perf_counter()
        batch, finished = scheduled_requests(scheduler_output, self._prompt_len)
        req_ids = [r for r, _, _, _ in batch]
        draws = self._token_ids[self._rng.integers(0, len(self._token_ids), len(batch))]
        sampled = [[int(tok)] if emits_token(c, s, n) else [] for (_, c, s, n), tok in zip(batch, draws)]
        if batch:
            columns = step_aggregates((c, s, self._prompt_len[r]) for r, c, s, _ in batch)
            step_s = float(self.latency.step_ms({k: np.array([v]) for k, v in columns.items()})[0]) / 1000.0
            # The host wakes a sleeper late (and more so when loaded): aim early by the lateness
            # recent steps saw, so the step the scheduler times is the modelled one.
            deadline = started + step_s
            remaining = deadline - self._late_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
            late_s = time.perf_counter() - deadline
            self._late_s = min(max(0.0, self._late_s + LATENESS_GAIN * late_s), MAX_LATENESS_SHARE * step_s)
            self.num_steps += 1
        for req_id in finished:
            self._prompt_len.pop(req_id, None)
        output = model_runner_output(req_ids, sampled)
        return _done(output) if non_block else output

    def sample_tokens(self, grammar_output, non_block: bool = False):
        raise RuntimeError("the emulated executor samples inside execute_model; sample_tokens is never needed")

    # --- the rest of the executor surface: no devices, no workers ------------------------------
    def determine_available_memory(self) -> list[int]:
        page_bytes = sum(spec.page_size_bytes for spec in self._specs.values())
        return [self.num_blocks * page_bytes]

    def get_kv_cache_specs(self) -> list[dict[str, Any]]:
        return [self._specs]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        return [[KV_CACHE_LAYOUT]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        pass

    def initialize_from_config(self, kv_cache_configs) -> None:
        self.kv_cache_configs = kv_cache_configs

    def compile_or_warm_up_model(self) -> None:
        pass

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block: bool = False):
        handlers = {
            "get_supported_tasks": lambda: ("generate",),
            "get_kv_connector_handshake_metadata": lambda: None,
            "reset_mm_cache": lambda: None,
            "reset_encoder_cache": lambda: None,
            "execute_dummy_batch": lambda: None,
            "take_draft_token_ids": lambda: None,
            "shutdown": lambda: None,
            "check_health": lambda: None,
        }
        if not isinstance(method, str) or method not in handlers:
            raise NotImplementedError(f"emulated engine: {method!r} is not supported (no model runs here)")
        result = [handlers[method](*args, **(kwargs or {}))]
        return _done(result) if non_block else result

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _special_token_ids(model_config) -> set[int]:
    """Ids the emulated model must not emit: the tokenizer's special tokens (EOS, and the chat
    template's turn markers, which Ray Serve LLM's chat path may pass as stop tokens) and the
    config's EOS/BOS/PAD."""
    from transformers import AutoTokenizer

    ids: set[int] = set()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                                  trust_remote_code=model_config.trust_remote_code)
        ids.update(int(i) for i in tokenizer.all_special_ids)
    except Exception as err:  # noqa: BLE001 - the config's ids still apply
        log.warning("colocate: emulated engine could not read the tokenizer's special ids (%s)", err)
    for config in (model_config.hf_config, getattr(model_config, "hf_text_config", None)):
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    return ids
