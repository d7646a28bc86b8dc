"""Test doubles shared by the worker tests."""

from __future__ import annotations

import torch


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


class Generator(torch.nn.Module):
    """A stand-in model whose greedy generation appends `answer(prompt ids)` to each left-padded prompt."""

    def __init__(self, answer, pad_id):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer, self.pad_id, self.prompts = answer, pad_id, []

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = [i for i, m in zip(ids, mask, strict=True) if m]
            assert ids[len(ids) - len(prompt):] == prompt  # left padding: the prompt ends the row
            self.prompts.append(prompt)
            rows.append(ids + self.answer(prompt))
        width = max(map(len, rows))
        return torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows])
