"""Test doubles shared by the worker tests."""

from __future__ import annotations


class Reports:
    """A report() double: records (percent, value, metrics) and answers prune at `prune_at`."""

    def __init__(self, prune_at: int | None = None):
        self.calls: list[tuple[int, float, dict[str, float]]] = []
        self.prune_at = prune_at

    def __call__(self, pct: int, value: float, metrics: dict[str, float]) -> bool:
        self.calls.append((pct, value, metrics))
        return pct == self.prune_at

    @property
    def percents(self) -> list[int]:
        return [c[0] for c in self.calls]
