"""The interference profile document (`colocate interference` writes it, the controller reads it):
the largest static offline load at which a replayed chat load met the SLO, and the per-step
latency budget that goes with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROFILE_KIND = "ColocateInterferenceProfile"
PROFILE_VERSION = 1


def load_interference_profile(path: str | Path) -> dict[str, Any]:
    """Read a profile file, failing with the file and the problem."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(doc, dict) or doc.get("kind") != PROFILE_KIND or doc.get("version") != PROFILE_VERSION:
        raise ValueError(f"{p}: not a {PROFILE_KIND} version {PROFILE_VERSION}")
    budget = doc.get("step_budget_ms")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"{p}: step_budget_ms must be a positive number or null, got {budget!r}")
    return doc


def load_profile(path: str | None) -> dict[str, Any] | None:
    """The profile at `path`, or None when no profile is configured."""
    return load_interference_profile(path) if path else None
