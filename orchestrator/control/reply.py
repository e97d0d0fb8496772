"""The controller's reply to a replica's report: a budget and how long it stays valid.

Validity comes from when the controller *decided* the budget, not from when the reply arrived: a
controller whose ticks fail (or that stops deciding for one replica) keeps answering with its last
stored budget, and that budget must still expire `silence_timeout_s` after it was decided, so
that the engine falls back to the safe budget on its own. The age is computed on the
controller's clock and the deadline on the replica's, so no two hosts' wall clocks are compared;
the replica takes the whole round trip off the remaining validity (the conservative side).
"""

from __future__ import annotations

from typing import Any

from orchestrator.engine.budget import OfflineBudget


def make_reply(budget: dict[str, list[int]], *, decided_at_s: float, now_s: float,
               silence_timeout_s: float) -> dict[str, Any]:
    """`budget` holds `max_offline_seqs` and `max_offline_tokens` tables; times on the controller's clock."""
    return {**budget, "decided_at_s": decided_at_s,
            "expires_in_s": decided_at_s + silence_timeout_s - now_s}


def reply_budget(reply: dict[str, Any]) -> OfflineBudget:
    return OfflineBudget(tuple(reply["max_offline_seqs"]), tuple(reply["max_offline_tokens"]))


def remaining_validity_s(reply: dict[str, Any], round_trip_s: float) -> float:
    """Seconds the replied budget may still be applied, from the moment the reply was received;
    <= 0: it has expired (the replica leaves the engine to its fallback)."""
    return float(reply["expires_in_s"]) - max(0.0, round_trip_s)
