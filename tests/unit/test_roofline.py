"""The GPU-shaped roofline model against the published figures it is set against, and its shape."""

import numpy as np
import pytest

from latency_model.features import featurize
from latency_model.roofline import RooflineModel, gpu_spec, model_shape


def decode(num_reqs: int, context_tokens: int) -> dict[str, np.ndarray]:
    return {"num_prefill_tokens": np.array([0]), "num_prefill_reqs": np.array([0]),
            "prefill_context_tokens": np.array([0]), "prefill_attention_tokens2": np.array([0.0]),
            "num_decode_reqs": np.array([num_reqs]), "decode_context_tokens": np.array([num_reqs * context_tokens]),
            "max_decode_context_tokens": np.array([context_tokens])}


def prefill(num_tokens: int) -> dict[str, np.ndarray]:
    return {"num_prefill_tokens": np.array([num_tokens]), "num_prefill_reqs": np.array([1]),
            "prefill_context_tokens": np.array([0]),
            "prefill_attention_tokens2": np.array([num_tokens * num_tokens / 2]),
            "num_decode_reqs": np.array([0]), "decode_context_tokens": np.array([0]),
            "max_decode_context_tokens": np.array([0])}


@pytest.mark.parametrize(("gpu", "published_ms"), [
    ("a100-40gb", 1000.0 / 75),  # ~75 output tok/s, one request, vLLM 0.23 (johnmusgrave.com)
    ("h100-sxm", 6.48),          # TPOT p50 at concurrency 1, vLLM 0.21 (InferenceBench recipe)
])
def test_one_decode_of_llama_3_8b_is_within_ten_percent_of_the_published_step(gpu, published_ms):
    model = RooflineModel(model_shape("llama-3.1-8b"), gpu_spec(gpu))
    # 1,024-token prompts, 128 out: the context averages ~1,088 tokens.
    step_ms = float(model.step_ms(decode(1, 1088))[0])
    assert abs(step_ms - published_ms) / published_ms < 0.10, step_ms


def test_decode_throughput_grows_several_fold_with_batch_and_step_time_grows_slowly():
    model = RooflineModel(model_shape("llama-3.1-8b"), gpu_spec("a100-80gb"))
    steps = [float(model.step_ms(decode(b, 1000))[0]) for b in (1, 8, 64)]
    throughput = [b / s for b, s in zip((1, 8, 64), steps)]
    assert steps[0] < steps[1] < steps[2]
    assert throughput[1] > 6 * throughput[0]  # memory-bound: a batch of 8 costs little more than 1
    assert throughput[2] > 3 * throughput[1]
    # the published A100-40GB sweep: "a 6.6x gain ... up to a concurrency of 8"
    a100_40 = RooflineModel(model_shape("llama-3.1-8b"), gpu_spec("a100-40gb"))
    gain = 8 * float(a100_40.step_ms(decode(1, 1088))[0]) / float(a100_40.step_ms(decode(8, 1088))[0])
    assert 5.5 < gain < 8.0, gain


def test_a_long_prefill_is_compute_bound_and_linear_in_its_tokens():
    model = RooflineModel(model_shape("llama-3.1-8b"), gpu_spec("a100-80gb"))
    t1, t2 = (float(model.step_ms(prefill(n))[0]) for n in (1024, 2048))
    assert 1.9 < t2 / t1 < 2.3  # dense FLOPs double; attention a little more than doubles
    dense_flops = 2 * model.shape.num_layers * model.shape.num_layer_params * 1024
    assert t1 >= dense_flops / (model.gpu.peak_tflops * 1e12) * 1000.0  # never faster than peak


def test_an_empty_step_takes_no_time_and_the_protocol_matches_step_ms():
    model = RooflineModel(model_shape("llama-2-7b"), gpu_spec("h100-sxm"))
    cols = {k: np.concatenate([decode(16, 500)[k], prefill(256)[k], np.zeros(1)]) for k in decode(1, 1)}
    p50, p99 = model.predict_ms(featurize(cols))
    np.testing.assert_allclose(p50, model.step_ms(cols), rtol=1e-6)
    assert p50[2] == 0.0 and (p99 >= p50).all()


def test_kv_capacity_is_what_the_weights_leave_and_a_model_too_big_is_refused():
    shape = model_shape("llama-2-7b")
    tokens = RooflineModel(shape, gpu_spec("a100-80gb")).kv_cache_tokens(0.9)
    # 72 GiB usable - ~13.5 GB of weights - 2 GiB reserve, at 512 KiB per token (MHA, 32 layers)
    assert shape.kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert 100_000 < tokens < 130_000
    with pytest.raises(ValueError, match="does not fit"):
        RooflineModel(model_shape("llama-2-13b"), gpu_spec("a100-40gb")).kv_cache_tokens(0.5)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="llama-2-7b"):
        model_shape("gpt-5")
    with pytest.raises(KeyError, match="a100-80gb"):
        gpu_spec("tpu")


def test_step_aggregates_split_prefill_chunks_from_decodes_and_tokens_come_at_prompt_end():
    from latency_model.batch import emits_token, step_aggregates

    # a 300-token prompt in its second 128-token chunk, a decode at context 500, a new 40-token prompt
    agg = step_aggregates([(128, 128, 300), (500, 1, 420), (0, 40, 40)])
    assert agg["num_prefill_reqs"] == 2 and agg["num_prefill_tokens"] == 168
    assert agg["prefill_context_tokens"] == 128
    assert agg["prefill_attention_tokens2"] == 128 * (128 + 64) + 40 * 20
    assert agg["num_decode_reqs"] == 1 and agg["decode_context_tokens"] == 500
    assert not emits_token(128, 128, 300)  # a chunk that does not end the prompt yields nothing
    assert emits_token(256, 44, 300)       # the chunk that ends it yields the first token
    assert emits_token(500, 1, 501)        # a decode (500 computed, 501 held) yields one
    # recompute after preemption: 300 prompt + 20 generated, recomputed in chunks
    assert not emits_token(0, 256, 320) and emits_token(256, 64, 320)


def test_the_emulated_engine_is_wired_by_config_and_validated():
    from orchestrator.config import ColocateConfig
    from orchestrator.names import EMULATED_EXECUTOR, ENV_EMULATION
    from orchestrator.serving.app import engine_kwargs, replica_env

    cfg = ColocateConfig.model_validate({"replicas": {"engine": "emulated", "emulation": {"gpu": "h100-sxm"}}})
    assert engine_kwargs(cfg)["distributed_executor_backend"] == EMULATED_EXECUTOR
    shipped = replica_env(cfg)[ENV_EMULATION]
    assert type(cfg.replicas.emulation).model_validate_json(shipped) == cfg.replicas.emulation
    real = ColocateConfig()
    assert "distributed_executor_backend" not in engine_kwargs(real) and ENV_EMULATION not in replica_env(real)
    for bad, where in [({"engine": "emulated", "accelerator": "gpu"}, "accelerator: cpu"),
                       ({"engine": "emulated", "emulation": {"gpu": "h900"}}, "h900"),
                       ({"emulation": {"memory_efficiency": 1.5}}, "memory_efficiency"),
                       ({"engine_kwargs": {"distributed_executor_backend": "mp"}}, "distributed_executor_backend")]:
        with pytest.raises(ValueError, match=where):
            ColocateConfig.model_validate({"replicas": bad})
