"""``maskssd train --seeds``: the per-seed table; and the cells of seeds parents in ``maskssd runs``
(``mean ± std (n)``, their children hidden or listed under them)."""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from maskssd.cli.console import Column, TrainBar, err, fit_table, fmt_interval, out
from maskssd.errors import MaskSSDError

__all__ = ["SeedStat", "cell_text", "metric_cell", "run_order", "sort_grouped", "train_seeds"]

#: Tag values (maskssd.tracking.seeds), repeated here so that ``maskssd runs`` does not import training code.
_ROLE, _PARENT = "maskssd.role", "mlflow.parentRunId"


# ------------------------------------------------------------------------------------------- train
def train_seeds(a: argparse.Namespace, cfg: Any) -> int:
    """``maskssd train CONFIG --seeds 0,1,2`` / ``--folds K`` and ``--resume PARENT_ID``."""
    import time

    started = time.time()
    from maskssd.errors import RunStopped, TrainingInterrupted
    from maskssd.tracking import runs
    from maskssd.tracking.seeds import run_seeds

    try:
        r = run_seeds(
            cfg,
            a.seeds or ([] if a.resume else [cfg.experiment.seed]),
            tracking_uri=a.tracking_uri,
            resume_parent_id=a.resume,
            run_name=a.run_name,
            progress=None if a.no_progress else TrainBar(),
            folds=a.folds or 0,
            final_split=a.final_split,
            fold=a.fold,
        )
    except (TrainingInterrupted, RunStopped) as e:
        stopped = isinstance(e, RunStopped)
        err.print(
            ("[bold red]error:[/] " if stopped else "[yellow]")
            + f"{escape(str(e))}{'' if stopped else '; checkpoint saved.[/]'} Resume the missing runs with:\n"
            f"  maskssd train {a.config} --resume {e.run_id}"
            + (f" --tracking-uri {a.tracking_uri}" if a.tracking_uri else ""),
            highlight=False,
        )
        return 2 if stopped else 130
    if a.fold:
        return _fold_done(a, r, started)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if r.status == "FINISHED" else 1
    if a.record:
        write_run_record(a, r.parent_run_id, started, children=r)
    if a.save_detections and r.status == "FINISHED" and r.folds:
        err.print(f"detections written to {save_run_detections(a, r.parent_run_id)}", highlight=False)
    table, left_out = seeds_table(r, out.width)
    out.print(table)
    if left_out:
        out.print(f"[dim]not shown to fit {out.width} columns: {', '.join(left_out)} (in the MLflow UI)[/]")
    colour = "green" if r.status == "FINISHED" else "red"
    what = f"{r.folds} folds x {len(r.seeds)} seeds" if r.folds else f"{len(r.seeds)} seeds"
    out.print(f"[{colour}]parent run {r.parent_run_id} {r.status.lower()}[/] ({what})")
    out.print(f"see it: {runs.ui_link(r.parent_run_id, a.tracking_uri)}", highlight=False, soft_wrap=True)
    return 0 if r.status == "FINISHED" else 1


def check_fold(a: argparse.Namespace) -> None:
    """Refuse what ``--fold`` and ``--save-detections`` cannot do, before anything is trained."""
    if a.save_detections and a.seeds and len(a.seeds) > 1:
        raise MaskSSDError(
            "--save-detections writes one file: one run, or a --folds parent of one seed (each seed's "
            "out-of-fold detections are in its parent's detections/ folder)"
        )
    if a.fold is None:
        return
    if not a.folds and not a.resume:
        raise MaskSSDError("--fold k trains one fold of a cross-validation: say how many with --folds K")
    if a.folds and not 1 <= a.fold <= a.folds:
        raise MaskSSDError(f"--fold {a.fold}: a fold of --folds {a.folds} is 1 to {a.folds}")


def _fold_done(a: argparse.Namespace, r: Any, started: float) -> int:
    """``--fold k``: the fold's run (its record and detections file are the fold's), then where its parent
    stands: waiting for other folds, or finished with its out-of-fold evaluation."""
    from maskssd.tracking import runs

    mine = [s for (_, f), s in r.runs.items() if f == a.fold]
    ok = bool(mine) and all(s.status == "FINISHED" for s in mine)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if ok else 1
    if ok and len(mine) == 1:
        if a.record:
            write_run_record(a, mine[0].run_id, started)
        if a.save_detections:
            err.print(f"detections written to {save_run_detections(a, mine[0].run_id)}", highlight=False)
    for s in mine:
        colour = "green" if s.status == "FINISHED" else "red"
        how = "kept (it had finished)" if s.action == "kept" else s.status.lower()
        out.print(f"[{colour}]{s.label}: run {s.run_id} {how}[/]", highlight=False)
    if r.waiting:
        left = ", ".join(sorted({str(f) for _, f in r.waiting}, key=int))
        out.print(
            f"parent run {r.parent_run_id}: fold(s) {left} of {r.folds} still to train (--fold k, here or "
            "on another machine with this store); the last one scores out of fold",
            highlight=False,
        )
    else:
        table, _ = seeds_table(r, out.width)
        out.print(table)
        out.print(f"parent run {r.parent_run_id} {r.status.lower()} ({r.folds} folds)", highlight=False)
    out.print(f"see it: {runs.ui_link(r.parent_run_id, a.tracking_uri)}", highlight=False, soft_wrap=True)
    return 0 if ok else 1


def write_run_record(a: argparse.Namespace, run_id: str, started: float, children: Any = None) -> None:
    """``maskssd train --record FILE``: a run's final metrics, or a --seeds/--folds parent's summary (its
    children's final metrics and durations, the mean ± std, the out-of-fold evaluation and where its errors are),
    with provenance."""
    from maskssd.provenance import make_record, write_record
    from maskssd.tracking import runs
    from maskssd.tracking.seeds import is_final_metric

    c = runs.client(a.tracking_uri, create=False)
    run = c.get_run(run_id)

    def summary(r: Any) -> dict[str, Any]:
        end, start = r.info.end_time, r.info.start_time
        epochs = [m.value for m in c.get_metric_history(r.info.run_id, "train/epoch_seconds")]
        return {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "seed": r.data.tags.get("maskssd.seed", r.data.params.get("experiment.seed")),
            "fold": r.data.tags.get("maskssd.fold"),
            "seconds": (end - start) / 1000 if end and start else None,  # wall, a resume's gap included
            # the training's own pace: robust to a resume's gap and to a paused epoch
            "epochs": len(epochs),
            "epoch_seconds_median": statistics.median(epochs) if epochs else None,
            "config_hash": r.data.tags.get("config_hash"),
            "commit": r.data.tags.get("mlflow.source.git.commit"),
            "metrics": {k: v for k, v in r.data.metrics.items() if is_final_metric(k) or k == "best_epoch"},
        }

    doc: dict[str, Any] = {"config": str(a.config), "run": summary(run)}
    kind = "train"
    if children is not None:
        kind = "folds" if children.folds else "seeds"
        doc.update(
            seeds=children.seeds,
            folds=children.folds,
            children=[summary(c.get_run(s.run_id)) for s in children.runs.values() if s.run_id],
            aggregate=dict(children.aggregate),
            folds_hash=run.data.tags.get("data.folds_hash"),
        )
        if children.folds:
            from maskssd.tracking.folds import oof_errors

            doc["oof_errors"] = oof_errors(c, run_id)
    record = make_record(kind, doc, title=f"{a.config} ({kind})", started=started)
    out.print(f"record written to {write_record(a.record, record)}", highlight=False)


def save_run_detections(a: argparse.Namespace, run_id: str) -> str:
    """``maskssd train --save-detections FILE``: the run's validation detections (a fold run's: its fold, with
    the folds' digest, so the file joins the other folds' anywhere), or a one-seed --folds parent's pooled
    out-of-fold detections, written to FILE (gzip for ``.gz``). Returns where."""
    import tempfile

    from maskssd.evaluation.detections_file import load_detections, write_doc
    from maskssd.tracking import runs
    from maskssd.tracking.folds import download_oof, is_cv_parent

    c = runs.client(a.tracking_uri, create=False)
    with tempfile.TemporaryDirectory(prefix="maskssd-dets-") as tmp:
        if is_cv_parent(c, run_id):
            paths, _ = download_oof(c, run_id, tmp)
            if len(paths) > 1:
                raise MaskSSDError(
                    f"parent {run_id} has {len(paths)} seeds' out-of-fold files: write each with maskssd "
                    f"evaluate --model {run_id} --split oof --save-detections FILE (its first seed), or "
                    "download them from the run's detections/ folder"
                )
            doc = load_detections(paths[0])
        else:
            doc = load_detections(runs.download_detections(run_id, "val", Path(tmp), a.tracking_uri))
            data, run = doc.get("data") or {}, c.get_run(run_id)
            if data.get("fold") and not data.get("folds_hash"):  # a fold run of an older version
                seed = run.data.tags.get("maskssd.seed", run.data.params.get("experiment.seed", 0))
                data.update(folds_hash=run.data.tags.get("data.folds_hash"), seed=int(seed))
    return str(write_doc(a.save_detections, doc))


def seeds_table(r: Any, width: int | None = None) -> tuple[Table, list[str]]:
    """One row per child (its selected checkpoint's val mAP, test mAP, val AP per class), then mean ± std and,
    for cross-validation, the pooled out-of-fold AP with its interval; fitted to ``width`` columns (the
    per-class columns go first). Returns the table and the headers left out."""
    classes = sorted(
        k.removeprefix("val_ap_").removesuffix("_mean")
        for k in r.aggregate
        if k.startswith("val_ap_")
        and k.endswith("_mean")
        and not k.endswith(("_ci_low_mean", "_ci_high_mean"))
    )
    keys = ["val_map", "test_map", *[f"val_ap_{c}" for c in classes]]
    keys = [k for k in keys if f"{k}_mean" in r.aggregate or any(k in s.metrics for s in r.runs.values())]
    header = {"val_map": "val mAP", "test_map": "test mAP", **{f"val_ap_{c}": f"val {c}" for c in classes}}
    columns = [Column("seed", "seed", 0)]
    if r.folds:
        columns.append(Column("fold", "fold", 0))
    columns += [
        Column("run", "run", 4, justify="left"),
        Column("status", "status", 3, justify="left"),
        *[Column(k, header[k], 0 if k == "val_map" else 1 if k == "test_map" else 2) for k in keys],
    ]
    rows: list[dict[str, str]] = []
    for s in r.runs.values():
        status = s.status.lower() + (" (kept)" if s.action == "kept" else "")
        rows.append(
            {
                "seed": str(s.seed),
                "fold": str(s.fold),
                "run": (s.run_id or "")[:8],
                "status": status,
                **{k: cell_text(s.metrics.get(k)) for k in keys},
            }
        )

    mean = {k: cell_text(metric_cell(r.aggregate, k), all_of=len(r.runs)) for k in keys}  # count: if short
    rows.append({"seed": "mean", "run": "± std", **mean})
    if "oof_map" in r.aggregate:
        a = r.aggregate

        def oof(key: str) -> str:  # a class with no AP (none of its boxes in the data) is not logged
            return fmt_interval(a[key], a.get(f"{key}_ci_low"), a.get(f"{key}_ci_high")) if key in a else ""

        cells = {"val_map": oof("oof_map"), **{f"val_ap_{c}": oof(f"oof_ap_{c}") for c in classes}}
        rows.append({"seed": "oof", "run": "pooled", **{k: cells.get(k, "") for k in keys}})
    what = f"{r.folds} folds x {len(r.seeds)} seeds" if r.folds else "seeds"
    title = f"{what} of parent run {r.parent_run_id[:8]} (AP in %, the selected checkpoint)"
    return fit_table(title, columns, rows, width)


# -------------------------------------------------------------------------------------------- runs
class SeedStat(float):
    """A seeds parent's mean over its seeds (a float, so it sorts like one), with its std and seed count."""

    std: float
    n: int

    def __new__(cls, mean: float, std: float, n: int) -> SeedStat:
        obj = super().__new__(cls, mean)
        obj.std, obj.n = std, n
        return obj


def metric_cell(m: dict[str, float], key: str, *fallbacks: str) -> float | None:
    """A run's metric ``key`` (else the first of ``fallbacks`` it has), or for a seeds parent its
    ``mean ± std (n)``."""
    if f"{key}_mean" in m:
        return SeedStat(m[f"{key}_mean"], m.get(f"{key}_std", math.nan), int(m.get("n_seeds", 0)))
    return next((m[k] for k in (key, *fallbacks) if k in m), None)


def cell_text(v: Any, all_of: int | None = None) -> str:
    """Metrics in %: ``66.5``, a parent's ``66.5 ± 1.2 (3)`` (``66.5 (1)`` for one seed); the count left out
    when it is ``all_of`` (every child counted)."""
    if v is None:
        return ""
    if isinstance(v, SeedStat):
        spread = f" ± {100 * v.std:.1f}" if math.isfinite(v.std) else ""
        return f"{100 * v:.1f}{spread}" + ("" if v.n == all_of else f" ({v.n})")
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def run_order(runs: Sequence[Any], show_children: bool) -> list[tuple[Any, bool]]:
    """``(run, is_child)`` in table order: children of a listed seeds parent hidden, or (``show_children``)
    right under it."""
    parents = {r.info.run_id for r in runs if r.data.tags.get(_ROLE) == "seeds"}
    children: dict[str, list[Any]] = {}
    top = []
    for r in runs:
        parent = r.data.tags.get(_PARENT)
        if parent in parents:
            children.setdefault(parent, []).append(r)
        else:
            top.append(r)
    ordered: list[tuple[Any, bool]] = []
    for r in top:
        ordered.append((r, False))
        if show_children:
            kids = children.get(r.info.run_id, [])
            ordered += [(k, True) for k in sorted(kids, key=_seed_key)]
    return ordered


def _seed_key(run: Any) -> tuple[int, str]:
    raw = run.data.tags.get("maskssd.seed", "")
    return (int(raw), "") if raw.lstrip("-").isdigit() else (0, raw)


def sort_grouped(rows: list[dict[str, Any]], is_child: Sequence[bool], key: Callable[[Any], Any]) -> list:
    """Sort rows by ``key`` of their top row, each parent's child rows staying right under it."""
    groups: list[list[dict[str, Any]]] = []
    for row, child in zip(rows, is_child):
        if child and groups:
            groups[-1].append(row)
        else:
            groups.append([row])
    groups.sort(key=lambda g: key(g[0]))
    return [row for g in groups for row in g]
