"""A study's progress as a person watching it sees it: a bar that moves while trials train, not only when they
end. Used by `tunefleet demo` and `tunefleet study create --wait`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

__all__ = ["elapsed", "running_trial", "study_progress"]


def study_progress(study: dict[str, Any], trials: list[dict[str, Any]], total: int,
                   now: datetime | None = None) -> tuple[float, str]:
    """The bar's position and its text.

    A trial can train for many minutes between reports, so a bar that moved only when trials end would
    look stuck: each running trial counts for the fraction of its budget at its last rung, and the text
    names every running trial with that rung, its value and how long it has run (which changes on every
    poll). Workers report nothing between rungs, so nothing finer is known.
    """
    c = study["counts"]
    unfinished = [t for t in trials if t["state"] == "RUNNING"]  # held by a worker, or paused at a rung
    running = sorted((t for t in unfinished if t.get("paused_at") is None), key=lambda t: t["number"])
    paused = c.get("paused", 0)
    finished = study["trials_used"] - c["running"] - paused
    partial = sum(max(map(int, t.get("intermediate_values") or {}), default=0) / 100 for t in unfinished)
    text = f"{c['running']} running, {c['pruned']} pruned, {c['complete']} complete"
    if paused:
        text += f", {paused} paused"
    if running:
        text += " | " + "; ".join(running_trial(t, now) for t in running)
    return min(finished + partial, total), text


def running_trial(t: dict[str, Any], now: datetime | None = None) -> str:
    """`#3 at 20%: 0.41, 2m05s`: a running trial's number, last rung and value, and time since it started."""
    rungs = t.get("intermediate_values") or {}
    last = max(rungs, key=int, default=None)
    where = f"at {last}%: {rungs[last]:.2f}" if last is not None else "before its first rung"
    return f"#{t['number']} {where}, {elapsed(t.get('datetime_start'), now)}"


def elapsed(start: str | None, now: datetime | None = None) -> str:
    """`45s`, `2m05s` or `1h02m` since `start` (ISO time from the server); `?` when unknown."""
    if not start:
        return "?"
    began = datetime.fromisoformat(start.replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
    # The server answers with offsets; a naive time (an older server) is this machine's local time.
    now = now or (datetime.now(timezone.utc) if began.tzinfo else datetime.now())
    seconds = max(0, int((now - began).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
