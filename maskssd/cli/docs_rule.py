"""The decision rule of the Results page, written before the results it judges, applied to the records: ship
the study's winner (A) over the shipped recipe (B) only if all three conditions hold."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: The decision rule of the Results page (written before the results it judges): ship the study's winner (A)
#: over the shipped recipe (B) only if all three hold.
SHIP_RULE = {"rare_a_wins": 0.9, "map_low": -0.01, "minutes": 30.0}


def verdict(
    rec: Mapping[str, Any],
    folds: Mapping[str, Any] | None,
    paper: Mapping[str, Any] | None,
    minutes_of: Callable[[Mapping[str, Any]], str],
    where: Callable[[Mapping[str, Any]], str],
) -> str:
    """The rule's conditions for a compare record ``rec`` (A: the winner), each with the number that decides
    it, and the verdict. ``folds``/``paper``: the winner's fold and paper-split records (or None)."""
    # A's runs: a compare of two --folds parents names the parents, of pooled seeds the children
    kids = {c["run_id"] for c in (folds or {}).get("children", [])} | {
        (folds or {}).get("run", {}).get("run_id")
    }
    if kids & set(rec["b"]) and not kids & set(rec["a"]):
        return "\n\n*This record compares the winner as B: run `maskssd compare WINNER SHIPPED` for the verdict.*"
    rare, whole = rec["metrics"].get("mask_weared_incorrect"), rec["metrics"].get("map")
    checks = []
    if rare is not None:
        checks.append(
            (
                rare["a_wins"] >= SHIP_RULE["rare_a_wins"],
                f"rare class: P(A > B) {rare['a_wins']:.2f}, at least {SHIP_RULE['rare_a_wins']:g} asked",
            )
        )
    if whole is not None:
        checks.append(
            (
                whole["low"] >= SHIP_RULE["map_low"],
                f"mAP: the difference's interval reaches {100 * whole['low']:+.1f} points, no lower than"
                f" {100 * SHIP_RULE['map_low']:+.1f} asked",
            )
        )
    if paper is not None:  # the winner's runs on the paper split: the rule's time
        minutes = minutes_of(paper)
        fast = _fast(minutes)
        checks.append(
            (
                fast,
                f"time: a run of A on the paper split takes {minutes} min ({where(paper)}), at most"
                f" {SHIP_RULE['minutes']:g} asked",
            )
        )
    elif not kids & set(rec["a"]):
        checks.append((None, "time: no `records/winner_folds.json` of A's runs to read it from"))
    else:
        minutes = minutes_of(folds)
        fast = _fast(minutes)
        checks.append(
            (
                False if not fast else None,
                f"time: A's fold runs take {minutes} min ({where(folds)}), at most"
                f" {SHIP_RULE['minutes']:g} asked"
                + (
                    ""
                    if not fast
                    else "; a paper-split run trains on more images: `records/winner_seeds.json` will show it"
                ),
            )
        )
    mark = {True: "met", False: "**not met**", None: "not shown"}
    ships = all(ok is True for ok, _ in checks)
    verdict = (
        "**Verdict: the winner ships** (every condition met)."
        if ships
        else "**Verdict: the shipped recipe stays**; the winner's numbers are a finding."
    )
    lines = "\n".join(f"- {text}: {mark[ok]}" for ok, text in checks)
    return f"\n\nThe rule above, condition by condition (A: the winner, B: the shipped recipe):\n\n{lines}\n\n{verdict}"


def _fast(minutes: str) -> bool:
    """Whether a run's minutes (as rendered; "–" when unknown) are within the rule's time."""
    return minutes != "–" and float(minutes) <= SHIP_RULE["minutes"]
