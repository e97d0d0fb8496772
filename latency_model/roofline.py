"""A GPU-shaped step-latency model: an analytic roofline of a named model shape on a named GPU.

This is a model, not a measurement. A step is two phases that run one after the other on the GPU:
the dense layers (every scheduled token through every weight matrix) and attention (each query
token against its context's K/V). Each phase takes the longer of its compute time and its memory
time (the roofline), at an achieved fraction of the GPU's peak; a fixed per-step cost covers
kernel launches and sampling. The host's own scheduling time is not in it: an emulated engine
adds that by really running vLLM's scheduler.

Inputs are the per-step aggregates of `latency_model.schema` (the same ones the trained CPU model
and the controller use), so this model fits the `LatencyModel` protocol and a step described by
the telemetry can be timed without knowing its requests.

Published figures it is set against (tests/unit/test_roofline.py checks them):
- Llama-3.1-8B BF16 on an A100 40GB, vLLM 0.23, one request (1,024-token prompt, 128 out):
  about 75 output tok/s, i.e. ~13.3 ms per decode step, "roughly 77% of the GPU's
  memory-bandwidth ceiling" (johnmusgrave.com, "vLLM throughput-latency sweep on NVIDIA A100").
- Llama-3.1-8B FP16 on an H100 80GB HBM3, vLLM 0.21: TPOT p50 6.48 ms at concurrency 1 and
  6.59 ms at 4 (yobitelcomm InferenceBench, concurrency-sweep recipe, 2026-05-16).
The default efficiencies (memory 0.77, compute 0.6) come from the first figure and from the
usual large-GEMM utilisation of an A100; they are config, not constants of nature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from latency_model.features import FEATURE_NAMES

BYTES_PER_PARAM_BF16 = 2


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama family: gated MLP, grouped-query attention)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layer_params(self) -> int:
        """Weights of one layer's dense matrices (q, k, v, o and the three MLP matrices)."""
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return d * d + 2 * d * kv + d * d + 3 * d * self.intermediate_size

    @property
    def num_params(self) -> int:
        """Dense weights read every step: the layers and the LM head (embeddings are a lookup)."""
        return self.num_layers * self.num_layer_params + self.hidden_size * self.vocab_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers, in BF16."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BYTES_PER_PARAM_BF16

    @property
    def weight_bytes(self) -> int:
        return (self.num_params + self.hidden_size * self.vocab_size) * BYTES_PER_PARAM_BF16


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense BF16, no sparsity)."""

    name: str
    peak_tflops: float
    memory_bandwidth_tbps: float
    memory_gib: float


MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s for s in (
        ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
    )
}
GPUS: dict[str, GpuSpec] = {
    g.name: g for g in (
        GpuSpec("a100-40gb", 312.0, 1.555, 40.0),
        GpuSpec("a100-80gb", 312.0, 2.039, 80.0),
        GpuSpec("h100-sxm", 989.0, 3.35, 80.0),
        GpuSpec("h200", 989.0, 4.8, 141.0),
    )
}


def model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {sorted(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def gpu_spec(name: str) -> GpuSpec:
    if name not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; known: {sorted(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class RooflineModel:
    shape: ModelShape
    gpu: GpuSpec
    compute_efficiency: float = 0.6
    """Achieved share of peak FLOP/s, in (0, 1]."""
    memory_efficiency: float = 0.77
    """Achieved share of peak memory bandwidth, in (0, 1]."""
    step_overhead_ms: float = 0.3
    """Fixed GPU-side cost of a step (launches, sampling), ms."""
    p99_factor: float = 1.0
    """p99 / p50 of the modelled step: 1.0, a deterministic GPU (the host adds its own jitter)."""

    def step_ms(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Modelled latency (ms) of each step described by the aggregate columns."""
        s = self.shape
        col = {k: np.asarray(columns[k], dtype=np.float64) for k in
               ("num_prefill_tokens", "num_prefill_reqs", "prefill_context_tokens",
                "prefill_attention_tokens2", "num_decode_reqs", "decode_context_tokens")}
        num_tokens = col["num_prefill_tokens"] + col["num_decode_reqs"]
        # The LM head runs for the tokens that are sampled: one per decode and at most one per
        # prefill chunk (an upper bound: only the chunk that ends a prompt samples).
        num_sampled = col["num_prefill_reqs"] + col["num_decode_reqs"]
        flops_per_s = self.gpu.peak_tflops * 1e12 * self.compute_efficiency
        bytes_per_s = self.gpu.memory_bandwidth_tbps * 1e12 * self.memory_efficiency
        dense_flops = 2.0 * (s.num_layers * s.num_layer_params * num_tokens + s.hidden_size * s.vocab_size * num_sampled)
        dense_bytes = float(s.num_params * BYTES_PER_PARAM_BF16) + 2.0 * BYTES_PER_PARAM_BF16 * s.hidden_size * num_tokens * s.num_layers
        dense_s = np.maximum(dense_flops / flops_per_s, dense_bytes / bytes_per_s)
        # Attention: QK^T and AV are 2 * 2 * head_dim FLOPs per (query, key) pair per head.
        # Prefill pairs: chunk * (context + chunk / 2) (causal); decode: one query per context token.
        pairs = col["prefill_attention_tokens2"] + col["decode_context_tokens"]
        attn_flops = 4.0 * s.num_layers * s.num_heads * s.head_dim * pairs
        # K/V read once per request per step (context) and written for the new tokens.
        kv_tokens = col["prefill_context_tokens"] + col["decode_context_tokens"] + num_tokens
        attn_bytes = s.kv_bytes_per_token * kv_tokens
        attn_s = np.maximum(attn_flops / flops_per_s, attn_bytes / bytes_per_s)
        busy = num_tokens > 0
        return np.where(busy, (dense_s + attn_s) * 1000.0 + self.step_overhead_ms, 0.0)

    def predict_ms(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p50_ms, p99_ms) per row of `latency_model.features.featurize` output: the
        `LatencyModel` protocol, so the controller or the simulator can use it."""
        x = np.asarray(features, dtype=np.float64)
        p50 = self.step_ms({name: x[:, i] for i, name in enumerate(FEATURE_NAMES)})
        return p50, p50 * self.p99_factor

    def kv_cache_tokens(self, gpu_memory_utilization: float = 0.9, activation_reserve_gib: float = 2.0) -> int:
        """Tokens of K/V that fit beside the weights: what vLLM's memory profile would leave."""
        free = self.gpu.memory_gib * 2**30 * gpu_memory_utilization - self.shape.weight_bytes - activation_reserve_gib * 2**30
        if free <= 0:
            raise ValueError(f"{self.shape.name} does not fit on {self.gpu.name} at utilisation {gpu_memory_utilization}")
        return int(free // self.shape.kv_bytes_per_token)
