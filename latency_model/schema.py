"""The step-telemetry dataset: one row per engine step, versioned.

Written by the engine-side telemetry (Parquet via pyarrow) and read by `colocate train`. A step
is described by aggregates of its scheduled requests, so a row has a fixed width whatever the
batch size, and the same aggregates can be computed for a hypothetical batch the controller asks
the latency model about.

Version 1 columns (all per step):
  step_latency_ms           measured model-execution time of the step (schedule -> outputs)
  num_prefill_tokens        prompt tokens computed this step (all prefill chunks)
  num_prefill_reqs          requests with a prefill chunk this step
  prefill_context_tokens    sum over prefill requests of tokens already in their KV cache
  prefill_attention_tokens2 sum over prefill requests of chunk * (context + chunk / 2): the
                            quadratic attention work of chunked prefill
  num_decode_reqs           requests decoding one token this step
  decode_context_tokens     sum of the decode requests' context lengths (KV read per step)
  max_decode_context_tokens longest decode context
  num_offline_reqs          scheduled requests of class offline
  kv_cache_usage            fraction of KV blocks in use, in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1

STEP_SCHEMA = pa.schema(
    [
        ("step_latency_ms", pa.float64()),
        ("num_prefill_tokens", pa.int64()),
        ("num_prefill_reqs", pa.int64()),
        ("prefill_context_tokens", pa.int64()),
        ("prefill_attention_tokens2", pa.float64()),
        ("num_decode_reqs", pa.int64()),
        ("decode_context_tokens", pa.int64()),
        ("max_decode_context_tokens", pa.int64()),
        ("num_offline_reqs", pa.int64()),
        ("kv_cache_usage", pa.float64()),
    ],
    metadata={"colocate.step_schema_version": str(SCHEMA_VERSION)},
)


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


def read_steps(path: str | Path) -> pa.Table:
    """Read a step dataset, checking its schema version and columns."""
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        table = pq.read_table(p)
    except FileNotFoundError:
        raise DatasetError(f"{p}: no such file") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{p}: not a readable Parquet file ({err})") from None
    meta = table.schema.metadata or {}
    version = meta.get(b"colocate.step_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise DatasetError(f"{p}: step schema version {version}, expected {SCHEMA_VERSION}")
    missing = [f.name for f in STEP_SCHEMA if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"{p}: missing columns {missing}")
    if table.num_rows == 0:
        raise DatasetError(f"{p}: no rows")
    return table.select([f.name for f in STEP_SCHEMA]).cast(STEP_SCHEMA)
