"""The docs' comparison tables and the rare-class levers (issue 24): each lever and its baseline trained fold by
fold, their joined out-of-fold comparison, and the verdict of the rule written before any lever's result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskssd.cli.docs_base import CLASSES, SHORT, Records, ci, missing, pct, source, table, where
from maskssd.cli.docs_base import minutes as _minutes
from maskssd.cli.docs_rule import lever_verdict


def _short(ref: str) -> str:
    """A compared run's id (first 8 characters), or a detections file's name; joined fold files: each, by ``+``."""
    if "," in ref:
        return " + ".join(_short(x) for x in ref.split(","))
    return Path(ref).name if ref.endswith((".json", ".json.gz")) else ref[:8]


def t_compare(name: str) -> Callable[[Records], str]:
    def render(r: Records) -> str:
        rec = r.get(name)
        if rec is None:
            return missing(name, how=f"maskssd compare A B --record records/{name}.json")
        rows = []
        for key, m in rec["metrics"].items():
            label = "**mAP**" if key == "map" else SHORT.get(key, key)
            rows.append(
                [
                    label,
                    pct(m["a"]),
                    pct(m["b"]),
                    ci(m["diff"], m["low"], m["high"], signed=True),
                    f"{m['a_wins']:.2f}",
                ]
            )
        head = ["", "A", "B", f"A − B [{100 * rec['ci']:g}% CI]", "P(A > B)"]
        text = table(head, rows)
        return text + (
            f"\n\nA = `{', '.join(map(_short, rec['a']))}`, B = `{', '.join(map(_short, rec['b']))}`: {rec['split']}"
            f" split, {rec['images']} images, {rec['n']} paired resamples; {where(rec)}; {source(rec, name)}."
        )

    return render


#: Folds of the levers' cross-validations, trained fold by fold (``--folds 3 --fold k``: one run each, so a
#: cross-validation longer than a session, or than a machine's life, is finished over several), each fold's run
#: record ``records/<prefix>_fold<k>.json`` and its fold's detections ``records/<prefix>_fold<k>.oof.json.gz``.
LEVER_FOLDS = 3
#: The levers' baseline: the shipped recipe, trained fold by fold on the same folds.
BASELINE = ("the shipped recipe", "experiments/cpu_effnet_lite0_pan_s4_rfs.toml", "accurate")

#: Rare-class levers (issue 24), each the shipped recipe with one change: its label, its config (None: the
#: shipped fold models scored again with an inference setting, ``how`` says with what), its fold records'
#: prefix and its paired out-of-fold record against the shipped recipe.
LEVERS = (
    ("the recipe at 448 px", "experiments/cpu_effnet_lite0_pan_s4_rfs_448.toml", "accurate448", None),
    (
        "crops kept around a rare face",
        "experiments/cpu_effnet_lite0_pan_s4_rfs_rarecrop.toml",
        "accurate_rarecrop",
        None,
    ),
    (
        "the mirrored image at inference (TTA)",
        None,
        "accurate_tta_vs_accurate_oof",
        "maskssd evaluate --model SHIPPED_CV --split oof --tta-hflip --save-detections tta.json",
    ),
)


def _fold_files(prefix: str) -> str:
    return ",".join(f"records/{prefix}_fold{k}.oof.json.gz" for k in range(1, LEVER_FOLDS + 1))


def _train_fold(config: str, prefix: str) -> str:
    return (
        f"maskssd train {config} --folds {LEVER_FOLDS} --fold K --record records/{prefix}_foldK.json"
        f" --save-detections records/{prefix}_foldK.oof.json.gz"
    )


def _fold_runs(r: Records, prefix: str) -> dict[str, Any] | None:
    """A cross-validation trained fold by fold, as the record of a parent: each fold's run a child (for its
    minutes and run ids); None before its first fold."""
    recs = [r.get(f"{prefix}_fold{k}") for k in range(1, LEVER_FOLDS + 1)]
    kids = [{**rec["run"], "fold": str(k)} for k, rec in enumerate(recs, start=1) if rec]
    if not kids:
        return None
    first = next(rec for rec in recs if rec)
    return {**first, "children": kids}


def t_fold_runs(label: str, config: str, prefix: str) -> Callable[[Records], str]:
    """One row per fold run: its own fold's AP (the checkpoint was chosen on it, so optimistic: the verdicts
    read the joined out-of-fold comparison, not these), its minutes and where it ran."""

    def render(r: Records) -> str:
        rows, notes = [], []
        if _fold_runs(r, prefix) is None:
            return f"**{label}**: *no fold trained yet. Train each with `{_train_fold(config, prefix)}`, K = 1 to {LEVER_FOLDS}.*"
        for k in range(1, LEVER_FOLDS + 1):
            name = f"{prefix}_fold{k}"
            rec = r.get(name)
            if rec is None:
                rows.append([str(k), "–", "–", *["–" for _ in CLASSES], "not trained yet"])
                continue
            m = rec["run"]["metrics"]
            rows.append(
                [
                    str(k),
                    f"`{rec['run']['run_id'][:8]}`",
                    ci(m.get("val_map"), m.get("val_map_ci_low"), m.get("val_map_ci_high")),
                    *[pct(m.get(f"val_ap_{c}")) for c in CLASSES],
                    f"{_minutes(rec)} min, {where(rec)}",
                ]
            )
            notes.append(f"fold {k}: {source(rec, name)}")
        head = ["fold", "run", "its fold's mAP [95% CI]", *[SHORT[c] for c in CLASSES], "minutes, where"]
        text = f"**{label}**, fold by fold (`{_train_fold(config, prefix)}`, K = 1 to {LEVER_FOLDS}):\n\n"
        return text + table(head, rows, "llrrrrl") + ("\n\n" + "; ".join(notes) + "." if notes else "")

    return render


def t_levers(r: Records) -> str:
    """Every rare-class lever against the shipped recipe, paired out of fold, with the verdict of the rule
    written before any lever's result; a lever not yet run says how to run it."""
    parts = []
    base_files = _fold_files(BASELINE[2])
    for label, config, prefix, how in LEVERS:
        name = f"{prefix}_vs_accurate_oof" if config else prefix
        if config:
            parts.append(t_fold_runs(label, config, prefix)(r))
        if r.get(name) is None:
            make = (
                f"{how}`, then `maskssd compare FILE SHIPPED_CV"
                if how
                else (f"maskssd compare {_fold_files(prefix)} {base_files}")
            )
            parts.append(
                f"**{label}**, against the shipped recipe: "
                + missing(name, how=f"{make} --record records/{name}.json")
            )
            continue
        parts.append(
            f"**{label}** against the shipped recipe (`{how or 'maskssd compare'}`):\n\n" + t_compare(name)(r)
        )
        folds_rec = _fold_runs(r, prefix) if config else None
        parts.append(lever_verdict(r[name], folds_rec, _minutes, where, inference_only=config is None))
    return "\n\n".join(parts)


def t_baseline_folds(r: Records) -> str:
    """The levers' baseline, the shipped recipe trained fold by fold, and what joining its folds gives."""
    return t_fold_runs(*BASELINE)(r)
