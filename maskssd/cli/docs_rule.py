"""Decision rules written before the results they judge, applied to the records: the Results page's (ship the
study's winner over the shipped recipe only if all three conditions hold), and the results log's rules for a
cheaper real-time accurate model (issue 27) and for a rare-class lever (issue 24). Each renders its conditions,
each with the number that decides it, then its verdict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from maskssd.cli.docs_base import table

#: The decision rule of the Results page (written before the results it judges): ship the study's winner (A)
#: over the shipped recipe (B) only if all three hold.
SHIP_RULE = {"rare_a_wins": 0.9, "map_low": -0.01, "minutes": 30.0}

#: The results log's rule for a cheaper accurate model (A) against the shipped one (B), written before it was
#: trained: paired out of fold, mAP interval no lower than -1 point and the rare class's mean difference no
#: worse than -2; its real-time path (the CPU default, ONNX Runtime float) at 60 FPS natively, 30 held to AVX2.
REALTIME_RULE = {"map_low": -0.01, "rare_diff": -0.02, "fps_native": 60.0, "fps_avx2": 30.0}
#: The results log's rule for a rare-class lever (A: the shipped recipe with one config change, B: without),
#: written before any lever's result: paired out of fold on the same folds, the rare class higher in at least
#: 0.9 of the resamples and the mAP interval no lower than -1 point; one costing more than the goal's minutes
#: ships beside the accurate configuration, not in its place.
LEVER_RULE = {"rare_a_wins": 0.9, "map_low": -0.01, "minutes": SHIP_RULE["minutes"]}
REALTIME_CASE = "onnx: detect(), decoded from the display threshold"
#: Issue 27's goal for the shipped accurate model's real-time path (``maskssd detect`` on a video): the default
#: backend (``--backend auto``: int8 on a CPU with VNNI for a model carrying its calibration, ONNX Runtime float
#: without VNNI) at 60 FPS natively and 30 held to AVX2; int8 at 45 where VNNI exists.
REALTIME_GOAL = {"default": (60.0, 30.0), "onnx-int8": (45.0, None)}
MARK = {True: "met", False: "**not met**", None: "not shown"}


Check = tuple[bool | None, str]


def _map_check(whole: Mapping[str, float], low: float) -> Check:
    """The mAP difference's interval against the lowest it may reach."""
    return (
        whole["low"] >= low,
        f"mAP: the difference's interval reaches {100 * whole['low']:+.1f} points, no lower than"
        f" {100 * low:+.1f} asked",
    )


def _rare_wins_check(rare: Mapping[str, float], at_least: float) -> Check:
    """The rare class's share of resamples in which A is higher."""
    return (
        rare["a_wins"] >= at_least,
        f"rare class: P(A > B) {rare['a_wins']:.2f}, at least {at_least:g} asked",
    )


def _conditions(checks: list[Check], who: str) -> str:
    lines = "\n".join(f"- {text}: {MARK[ok]}" for ok, text in checks)
    return f"The rule, condition by condition ({who}):\n\n{lines}"


def _runs_of(folds: Mapping[str, Any] | None) -> set[str]:
    """A cross-validation record's parent and children (a compare names the parents, of pooled seeds the
    children)."""
    folds = folds or {}
    return {c["run_id"] for c in folds.get("children", [])} | {folds.get("run", {}).get("run_id")}


def verdict(
    rec: Mapping[str, Any],
    folds: Mapping[str, Any] | None,
    paper: Mapping[str, Any] | None,
    minutes_of: Callable[[Mapping[str, Any]], str],
    where: Callable[[Mapping[str, Any]], str],
) -> str:
    """The rule's conditions for a compare record ``rec`` (A: the winner), each with the number that decides
    it, and the verdict. ``folds``/``paper``: the winner's fold and paper-split records (or None)."""
    kids = _runs_of(folds)
    if kids & set(rec["b"]) and not kids & set(rec["a"]):
        return "\n\n*This record compares the winner as B: run `maskssd compare WINNER SHIPPED` for the verdict.*"
    rare, whole = rec["metrics"].get("mask_weared_incorrect"), rec["metrics"].get("map")
    checks = []
    if rare is not None:
        checks.append(_rare_wins_check(rare, SHIP_RULE["rare_a_wins"]))
    if whole is not None:
        checks.append(_map_check(whole, SHIP_RULE["map_low"]))
    if paper is not None:  # the winner's runs on the paper split: the rule's time
        minutes = minutes_of(paper)
        checks.append(
            (
                _fast(minutes),
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
    return "\n\n" + _conditions(checks, "A: the winner, B: the shipped recipe") + f"\n\n{verdict}"


def _fast(minutes: str) -> bool:
    """Whether a run's minutes (as rendered; "–" when unknown) are within the rule's time."""
    return minutes != "–" and float(minutes) <= SHIP_RULE["minutes"]


def lever_verdict(
    cmp: Mapping[str, Any],
    folds: Mapping[str, Any] | None,
    minutes_of: Callable[[Mapping[str, Any]], str],
    where: Callable[[Mapping[str, Any]], str],
    inference_only: bool = False,
) -> str:
    """The results log's rule for a rare-class lever (A: the shipped recipe with the lever, B: without), from
    the paired out-of-fold record ``cmp``; ``folds``: the lever's cross-validation record, for its minutes,
    which decide whether a passing lever joins the accurate configuration or ships beside it.
    ``inference_only``: a lever of the same fold models scored again (``maskssd evaluate --split oof``)."""
    if _runs_of(folds) & set(cmp["b"]):
        return "*This record compares the lever as B: run `maskssd compare LEVER_CV SHIPPED_CV` for the verdict.*"
    if cmp.get("partial"):
        held = ", ".join(map(str, cmp.get("folds_compared", [])))
        return (
            f"**No verdict yet**: fold(s) {held} of {cmp.get('folds', '?')} only, a part of the out-of-fold set;"
            " the rule reads all of it."
        )
    metrics = cmp["metrics"]
    whole, rare = metrics.get("map"), metrics.get("mask_weared_incorrect")
    checks: list[Check] = [
        _rare_wins_check(rare, LEVER_RULE["rare_a_wins"])
        if rare
        else (None, "rare class: not in the comparison"),
        _map_check(whole, LEVER_RULE["map_low"]) if whole else (None, "mAP: not in the comparison"),
    ]
    minutes = minutes_of(folds) if folds else "–"
    if inference_only:
        cost = "No training: the same fold models, scored again with the lever (it costs inference time)."
    elif folds:
        cost = f"Minutes per fold run: {minutes} ({where(folds)}); a paper-split run trains on more images."
    else:
        cost = "Minutes: no cross-validation record of the lever to read them from."
    if any(ok is False for ok, _ in checks):
        decided = "**Verdict: the lever is not kept**; its numbers are a finding."
    elif not all(ok is True for ok, _ in checks):
        decided = "**No verdict yet**: a condition is not measured."
    elif inference_only:
        decided = (
            "**Verdict: the lever passes**: it becomes the recommended setting for offline evaluation, not the"
            " real-time default (it costs inference time)."
        )
    elif _fast(minutes):
        decided = "**Verdict: the lever passes** and joins the accurate configuration."
    else:
        decided = (
            "**Verdict: the lever passes** but costs more than the goal's minutes (or they are unknown): it "
            "ships as a separate rare-class configuration, not in place of the accurate one."
        )
    return _conditions(checks, "A: with the lever, B: the shipped recipe") + f"\n\n{cost}\n\n{decided}"


def realtime_verdict(cmp: Mapping[str, Any] | None, bench: Mapping[str, Any] | None) -> str:
    """The cheaper model's rule, condition by condition: ``cmp`` the paired out-of-fold comparison (A: the
    cheaper model), ``bench`` its ``benchmarks.realtime_decode`` record (natively, then held to AVX2)."""
    rule, checks = REALTIME_RULE, []
    metrics = (cmp or {}).get("metrics", {})
    whole, rare = metrics.get("map"), metrics.get("mask_weared_incorrect")
    if whole is None or rare is None:
        checks.append((None, "accuracy: no paired out-of-fold comparison recorded yet"))
    else:
        checks.append(_map_check(whole, rule["map_low"]))
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
    if all(ok is True for ok, _ in checks):
        verdict = (
            "**Verdict: the cheaper model meets the rule**: it becomes the shipped accurate configuration."
        )
    elif any(ok is False for ok, _ in checks):
        verdict = "**Verdict: the accurate configuration stays**; the cheaper model's numbers are a finding."
    else:
        verdict = "**No verdict yet**: a condition is not measured."
    return _conditions(checks, "A: the cheaper model, B: the shipped one") + f"\n\n{verdict}"


def realtime_goal(bench: Mapping[str, Any]) -> str:
    """Issue 27's goal against a ``realtime_decode`` record of the shipped accurate model: each backend's
    ``detect()`` one frame at a time and with frames in flight (what ``maskssd detect`` runs on a video),
    natively and held to AVX2, with the FPS asked and whether it is met. The default backend is the one
    ``--backend auto`` picks on that CPU (:func:`maskssd.deploy.model_ref.resolve_backend`, for a model that
    carries its calibration images): int8 where the record's CPU has VNNI, float held to AVX2 (no VNNI)."""
    from maskssd.deploy.model_ref import resolve_backend

    vnni = "VNNI" in str((bench.get("machine") or {}).get("cpu_has", ""))
    rows = []
    for backend in ("onnx", "onnx-int8"):
        for held in (False, True):
            default = resolve_backend("auto", "cpu", int8_ready=True, vnni=vnni and not held)[0] == backend
            goal = (
                REALTIME_GOAL["default"][held] if default else REALTIME_GOAL.get(backend, (None, None))[held]
            )
            for how, pick in (
                (
                    "one frame at a time",
                    lambda c, b=backend: c == f"{b}: detect(), decoded from the display threshold",
                ),
                (
                    "frames in flight",
                    lambda c, b=backend: c.startswith(f"{b}: detect(),") and "in flight" in c,
                ),
            ):
                row = _row(bench, held, pick)
                if row is None:
                    continue
                fps = float(row["FPS"])
                met = "–" if goal is None else MARK[fps >= goal]
                where = "held to AVX2" if held else "natively"
                name = f"{backend} (the default)" if default else backend
                rows.append([name, how, where, f"{fps:.1f}", "–" if goal is None else f"{goal:g}", met])
    if not rows:
        return "*The record holds no `detect()` row of the goal's backends.*"
    return table(["backend", "frames", "CPU", "FPS", "asked", ""], rows, "lllrrl")


def _row(bench: Mapping[str, Any], emulated: bool, pick: Callable[[str], bool]) -> Mapping[str, Any] | None:
    """The first row of a ``realtime_decode`` record's native (or AVX2) table whose case ``pick`` accepts."""
    for tab in bench.get("tables", []):
        if ("emulated" in tab["title"]) != emulated:
            continue
        for row in tab["rows"]:
            if pick(row.get("case", "")) and row.get("FPS"):
                return row
    return None


def _fps(bench: Mapping[str, Any] | None, emulated: bool) -> float | None:
    """The real-time path's FPS in a ``realtime_decode`` record: its native table, or the one held to AVX2."""
    row = _row(bench or {}, emulated, lambda case: case == REALTIME_CASE)
    return None if row is None else float(row["FPS"])
