"""Clients of the stack: the benchmark, the demo and workload replay."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_path(path: str) -> str:
    """`path` relative to the project root where it lies inside it (results files are committed
    and must not name one machine's directories), else as given (a hub id, a path elsewhere)."""
    p = Path(path)
    return os.path.relpath(p, ROOT) if p.is_absolute() and p.is_relative_to(ROOT) else path
