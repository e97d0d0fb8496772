"""The offline budget an engine applies at every step: plain data, shared by the controller (which
decides it), the channel (which carries it) and the engine's step planner (which applies it)."""

from __future__ import annotations

from dataclasses import dataclass

TABLE_SIZE = 64
"""Budget entries by online request count; counts beyond the table use its last entry."""


@dataclass(frozen=True)
class OfflineBudget:
    """How much offline work an engine may run, by the number of online requests it holds.

    `max_offline_seqs[k]` and `max_offline_tokens[k]` apply while k online requests are running
    or waiting (the last entry for any larger k). A controller computes the tables ahead, so the
    engine reacts to a burst of chat at the next step without asking anyone.
    """

    max_offline_seqs: tuple[int, ...]
    max_offline_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (1 <= len(self.max_offline_seqs) <= TABLE_SIZE and len(self.max_offline_tokens) == len(self.max_offline_seqs)):
            raise ValueError(f"budget tables must have the same length, 1..{TABLE_SIZE}")
        if min(self.max_offline_seqs) < 0 or min(self.max_offline_tokens) < 0:
            raise ValueError("budgets cannot be negative")

    @classmethod
    def flat(cls, max_offline_seqs: int, max_offline_tokens: int) -> OfflineBudget:
        return cls((max_offline_seqs,), (max_offline_tokens,))

    def at(self, num_online: int) -> tuple[int, int]:
        i = min(num_online, len(self.max_offline_seqs) - 1)
        return self.max_offline_seqs[i], self.max_offline_tokens[i]


UNLIMITED = 1 << 30
