"""A bursty chat trace in the Azure LLM trace's CSV format (TIMESTAMP,ContextTokens,GeneratedTokens).

Inter-arrival times are drawn from a gamma distribution with the chosen coefficient of variation
(CV 1 is Poisson; CV 2 and more put most requests in bursts, with long lulls between them); the
prompt and output lengths are drawn, as pairs, from a real trace (the carried Azure conversation
trace by default). Seeded, so a trace is reproducible; generate another seed to measure on a
workload the system was not tuned on.

    python -m bench.bursty --out results/bursty-cv2-s1.csv --cv 2 --seed 1
    colocate bench --online-trace results/bursty-cv2-s1.csv
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from profiler.workload import AZURE_CONV


def gamma_interarrivals_s(num: int, *, rate_per_s: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """`num` inter-arrival times with mean 1/rate and coefficient of variation `cv` (gamma:
    shape 1/cv^2, scale cv^2/rate)."""
    if rate_per_s <= 0 or cv <= 0:
        raise ValueError("rate_per_s and cv must be positive")
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate_per_s * shape), size=num)


def bursty_trace(*, num_requests: int, rate_per_s: float, cv: float, seed: int,
                 lengths_from: Path = AZURE_CONV) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    source = pd.read_csv(lengths_from)
    picks = rng.integers(0, len(source), size=num_requests)
    gaps = gamma_interarrivals_s(num_requests, rate_per_s=rate_per_s, cv=cv, rng=rng)
    gaps[0] = 0.0
    start = datetime(2023, 11, 16, 18, 0, 0)
    stamps = [start + timedelta(seconds=float(t)) for t in np.cumsum(gaps)]
    return pd.DataFrame({
        "TIMESTAMP": [s.strftime("%Y-%m-%d %H:%M:%S.%f") for s in stamps],
        "ContextTokens": source["ContextTokens"].to_numpy()[picks],
        "GeneratedTokens": source["GeneratedTokens"].to_numpy()[picks],
    })


def measured_cv(frame: pd.DataFrame) -> float:
    ts = pd.to_datetime(frame["TIMESTAMP"]).astype("int64").to_numpy() / 1e9
    gaps = np.diff(ts)
    return float(np.std(gaps) / np.mean(gaps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bursty", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of inter-arrival times")
    p.add_argument("--rate", type=float, default=1.0, help="mean requests per second (the bench rescales it)")
    p.add_argument("--num-requests", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths-from", type=Path, default=AZURE_CONV, help="Azure-format CSV to draw lengths from")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out (nothing is overwritten)")
    frame = bursty_trace(num_requests=args.num_requests, rate_per_s=args.rate, cv=args.cv, seed=args.seed,
                         lengths_from=args.lengths_from)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"wrote {len(frame)} requests to {args.out} (inter-arrival CV {measured_cv(frame):.2f}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
