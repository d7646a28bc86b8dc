"""Test doubles shared by the worker tests."""

from __future__ import annotations


class Reports:
    """A report() double: records (percent, value, metrics); answers prune at `prune_at`, pause at `pause_at`."""

    def __init__(self, prune_at: int | None = None, pause_at: int | None = None):
        self.calls: list[tuple[int, float, dict[str, float]]] = []
        self.prune_at = prune_at
        self.pause_at = pause_at

    def __call__(self, pct: int, value: float, metrics: dict[str, float]) -> str:
        self.calls.append((pct, value, metrics))
        return "prune" if pct == self.prune_at else "pause" if pct == self.pause_at else "continue"

    @property
    def percents(self) -> list[int]:
        return [c[0] for c in self.calls]
