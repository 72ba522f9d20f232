"""What every rendered docs block shares: the classes' short names, numbers in percent with their intervals,
the machine and the record a table comes from, and markdown tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CLASSES", "SHORT", "Records", "ci", "mean_std", "missing", "pct", "source", "table", "where"]

Records = Mapping[str, dict[str, Any]]
CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
SHORT = {
    "with_mask": "with mask",
    "without_mask": "without mask",
    "mask_weared_incorrect": "worn incorrectly",
}


def pct(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def ci(v: Any, low: Any, high: Any, signed: bool = False) -> str:
    if low is None or high is None:
        return pct(v, signed)
    return f"{pct(v, signed)} [{pct(low, signed)}, {pct(high, signed)}]"


def mean_std(agg: Mapping[str, Any], key: str) -> str:
    m, s = agg.get(f"{key}_mean"), agg.get(f"{key}_std")
    if m is None:
        return "–"
    return pct(m) if s is None else f"{pct(m)} ± {pct(s)}"


def where(rec: Mapping[str, Any]) -> str:
    m = rec.get("machine", {})
    threads = f", {m['threads']} threads" if m.get("threads") else ""
    how = f"emulated: {m['emulated_by']}" if m.get("emulated_by") else "emulated"
    isa = f", {m['isa']}{f' ({how})' if m.get('emulated') else ''}" if m.get("isa") else ""
    if m.get("busy_cores") is not None:  # measured at the start; the 1-minute load lags behind it
        busy = f", {m['busy_cores']:.1f} cores busy at start: not idle" if m["busy_cores"] >= 0.5 else ""
    else:
        load = m.get("load_1min") or 0.0
        busy = f", load {load:.1f} at start: not idle" if load >= 0.5 else ""
    return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores{isa}{threads}{busy})"


def source(rec: Mapping[str, Any], name: str) -> str:
    commit = (rec.get("code") or {}).get("commit") or "?"
    return f"`records/{name}.json` (commit `{commit}`, {rec.get('created', '?')[:10]})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def missing(*names: str, how: str) -> str:
    listed = ", ".join(f"`records/{n}.json`" for n in names)
    return f"*Not measured yet: no {listed}. Make it with `{how}`.*"


def minutes(rec: Mapping[str, Any]) -> str:
    """Minutes per run, the median over a parent's children: its epochs x its median epoch time where the
    record has them (a resumed or paused run's wall time holds its gap), else its wall time."""

    def run_seconds(c: Mapping[str, Any]) -> float | None:
        if c.get("epoch_seconds_median") and c.get("epochs"):
            return c["epoch_seconds_median"] * c["epochs"]
        return c.get("seconds")

    secs = [run_seconds(c) for c in rec.get("children", [])] or [run_seconds(rec.get("run", {}))]
    secs = sorted(s for s in secs if s)
    return f"{secs[len(secs) // 2] / 60:.0f}" if secs else "–"
