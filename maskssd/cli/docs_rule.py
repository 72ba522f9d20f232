"""Decision rules written before the results they judge, applied to the records: the Results page's (ship the
study's winner over the shipped recipe only if all three conditions hold) and the results log's rule for a
cheaper real-time accurate model (issue 27)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: The decision rule of the Results page (written before the results it judges): ship the study's winner (A)
#: over the shipped recipe (B) only if all three hold.
SHIP_RULE = {"rare_a_wins": 0.9, "map_low": -0.01, "minutes": 30.0}

#: The results log's rule for a cheaper accurate model (A) against the shipped one (B), written before it was
#: trained: paired out of fold, mAP interval no lower than -1 point and the rare class's mean difference no
#: worse than -2; its real-time path (the CPU default, ONNX Runtime float) at 60 FPS natively, 30 held to AVX2.
REALTIME_RULE = {"map_low": -0.01, "rare_diff": -0.02, "fps_native": 60.0, "fps_avx2": 30.0}
REALTIME_CASE = "onnx: detect(), decoded from the display threshold"
MARK = {True: "met", False: "**not met**", None: "not shown"}


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
    ships = all(ok is True for ok, _ in checks)
    verdict = (
        "**Verdict: the winner ships** (every condition met)."
        if ships
        else "**Verdict: the shipped recipe stays**; the winner's numbers are a finding."
    )
    lines = "\n".join(f"- {text}: {MARK[ok]}" for ok, text in checks)
    return f"\n\nThe rule above, condition by condition (A: the winner, B: the shipped recipe):\n\n{lines}\n\n{verdict}"


def _fast(minutes: str) -> bool:
    """Whether a run's minutes (as rendered; "–" when unknown) are within the rule's time."""
    return minutes != "–" and float(minutes) <= SHIP_RULE["minutes"]


def realtime_verdict(cmp: Mapping[str, Any] | None, bench: Mapping[str, Any] | None) -> str:
    """The cheaper model's rule, condition by condition: ``cmp`` the paired out-of-fold comparison (A: the
    cheaper model), ``bench`` its ``benchmarks.realtime_decode`` record (natively, then held to AVX2)."""
    rule, checks = REALTIME_RULE, []
    metrics = (cmp or {}).get("metrics", {})
    whole, rare = metrics.get("map"), metrics.get("mask_weared_incorrect")
    if whole is None or rare is None:
        checks.append((None, "accuracy: no paired out-of-fold comparison recorded yet"))
    else:
        checks.append(
            (
                whole["low"] >= rule["map_low"],
                f"mAP: the difference's interval reaches {100 * whole['low']:+.1f} points, no lower than"
                f" {100 * rule['map_low']:+.1f} asked",
            )
        )
        checks.append(
            (
                rare["diff"] >= rule["rare_diff"],
                f"rare class: mean difference {100 * rare['diff']:+.1f} points, no worse than"
                f" {100 * rule['rare_diff']:+.1f} asked",
            )
        )
    for held, key in ((False, "fps_native"), (True, "fps_avx2")):
        fps = _fps(bench, emulated=held)
        where = "held to AVX2" if held else "natively"
        if fps is None:
            checks.append((None, f"speed {where}: no real-time benchmark of A recorded"))
        else:
            checks.append((fps >= rule[key], f"speed {where}: {fps:.1f} FPS, at least {rule[key]:g} asked"))
    lines = "\n".join(f"- {text}: {MARK[ok]}" for ok, text in checks)
    if all(ok is True for ok, _ in checks):
        verdict = (
            "**Verdict: the cheaper model meets the rule**: it becomes the shipped accurate configuration."
        )
    elif any(ok is False for ok, _ in checks):
        verdict = "**Verdict: the accurate configuration stays**; the cheaper model's numbers are a finding."
    else:
        verdict = "**No verdict yet**: a condition is not measured."
    return f"The rule, condition by condition (A: the cheaper model, B: the shipped one):\n\n{lines}\n\n{verdict}"


def _fps(bench: Mapping[str, Any] | None, emulated: bool) -> float | None:
    """The real-time path's FPS in a ``realtime_decode`` record: its native table, or the one held to AVX2."""
    for tab in (bench or {}).get("tables", []):
        if ("emulated" in tab["title"]) != emulated:
            continue
        for row in tab["rows"]:
            if row.get("case") == REALTIME_CASE and row.get("FPS"):
                return float(row["FPS"])
    return None
