"""Where a cross-validation's models go wrong, out of fold, rendered from a record's error analysis (the
``oof_errors`` of a ``--folds`` record, a study's ``best_oof_errors``): AP by face size per class, and what each
true class's boxes were called at the operating threshold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maskssd.cli.docs_base import SHORT, Records, missing, pct, source, table, where

__all__ = ["oof_by_size", "oof_confusion", "oof_size_by_recipe", "t_oof_errors"]


def oof_confusion(errors: Mapping[str, Any] | None, who: str, fidelity: str = "") -> str:
    """What each true class's boxes were called (a row per class, its share of that class's boxes; "missed": no
    detection above the threshold), and the false alarms; ``who`` names the models (e.g. "trial 2")."""
    if not errors:
        return ""
    labels, m = errors["labels"], errors["rows_true_columns_predicted"]
    names = [SHORT.get(c, c) for c in labels[1:]]
    rows = []
    for i, name in enumerate(names, start=1):
        n = sum(m[i])
        cells = [f"{m[i][j]} ({100 * m[i][j] / n:.0f}%)" if n else "0" for j in range(len(labels))]
        rows.append([name, str(n), cells[0], *cells[1:]])
    rows.append(["false alarm (no face)", "–", "–", *[str(v) for v in m[0][1:]]])
    return (
        f"\n\nWhat {who}'s models called every box of the {errors.get('images')} train+val images, out of "
        f"fold ({errors.get('folds')} folds, seed {errors.get('seed')}; detections scored at least "
        f"{errors.get('threshold')}){', ' + fidelity if fidelity else ''}. Rows: the true class; columns: what it "
        "was called.\n\n"
        + table(
            ["true class", "boxes", "missed", *[f"called {n}" for n in names]], rows, "lr" + "r" * len(labels)
        )
    )


def oof_by_size(errors: Mapping[str, Any] | None) -> str:
    """Out-of-fold AP per class and face size, each with its number of boxes (a size with none: "–")."""
    if not errors or not errors.get("ap_by_size"):
        return ""
    buckets, ap, n = errors["size_buckets"], errors["ap_by_size"], errors["n_gt_by_size"]
    rows = []
    for c in errors["labels"][1:]:
        cells = [
            f"{pct(ap[c].get(b['key']))} ({n[c][b['key']]})" if n[c].get(b["key"]) else "–" for b in buckets
        ]
        rows.append([SHORT.get(c, c), *cells, str(n[c]["all"])])
    return (
        f"\n\nAP (VOC07) by face size ({errors.get('size_measure')}), with the boxes of each size in brackets:\n\n"
        + table(["class", *[b["label"] for b in buckets], "boxes"], rows)
    )


#: Cross-validations of the accurate recipe whose errors are compared by face size (record, label).
BY_SIZE = (
    ("accurate_folds", "shipped recipe (384 px)"),
    ("accurate320_folds", "the recipe at 320 px"),
    ("accurate448_folds", "the recipe at 448 px"),
)


def oof_size_by_recipe(r: Records) -> str:
    """mAP and the rare class's AP per face size, a row per cross-validation of the accurate recipe whose record
    holds its errors: where an input size gains or loses."""
    rows, buckets = [], []
    for name, label in BY_SIZE:
        errors = (r.get(name) or {}).get("oof_errors") or {}
        if not errors.get("map_by_size"):
            continue
        buckets = errors["size_buckets"]
        rare = errors["ap_by_size"].get("mask_weared_incorrect", {})
        rows.append(
            [
                label,
                *[f"{pct(errors['map_by_size'].get(b['key']))} / {pct(rare.get(b['key']))}" for b in buckets],
            ]
        )
    if len(rows) < 2:
        return ""
    return (
        "\n\nmAP / worn-incorrectly AP by face size, out of fold, by input size (same folds and images):\n\n"
        + table(["recipe", *[b["label"] for b in buckets]], rows)
    )


def t_oof_errors(r: Records) -> str:
    """The shipped recipe's cross-validation: its errors by face size and by class, out of fold."""
    rec = r.get("accurate_folds")
    errors = (rec or {}).get("oof_errors")
    config = "experiments/cpu_effnet_lite0_pan_s4_rfs.toml"
    if rec is None:
        return missing(
            "accurate_folds", how=f"maskssd train {config} --folds 3 --record records/accurate_folds.json"
        )
    if not errors:  # written before records kept them: the finished parent writes its record again
        parent = rec.get("run", {}).get("run_id", "PARENT")
        return (
            "*`records/accurate_folds.json` predates the error analysis in records: write it again with "
            f"`maskssd train {config} --resume {parent} --record records/accurate_folds.json`.*"
        )
    body = oof_by_size(errors) + oof_confusion(errors, "the shipped recipe") + oof_size_by_recipe(r)
    cited = [n for n, _ in BY_SIZE if n == "accurate_folds" or (r.get(n) or {}).get("oof_errors")]
    return body.strip() + "\n\n" + "\n".join(f"- {where(r[n])}, {source(r[n], n)}" for n in cited)
