"""Cross-validation's parent-side work: the folds it uses, and its out-of-fold evaluation.

``maskssd train CONFIG --folds K`` (:func:`maskssd.tracking.seeds.run_seeds` with ``folds``) trains one child
per fold (and seed); child ``k`` validates, and selects its checkpoint, on fold ``k``. Once every child has
finished, the parent scores every train+val image once, with the model that did not see it: each child's
``detections/val.json`` is its fold's detections, and the folds together are the whole set.

The parent then logs two views of the same children, because they answer different questions:

* **pooled out-of-fold AP** (``oof_map``, ``oof_ap_<class>``, with a bootstrap interval over the images): one
  AP over all K x (images per fold) images, as many boxes of the rare class as the train and val splits hold,
  so its interval is narrow enough to see a rare-class gain. It ranks detections of K different models
  together, so it also pays for their score scales differing;
* **the mean and std of the per-fold APs** (``val_map_mean``/``_std`` of the children): each fold's AP from one
  model, no mixing of scales, but each on 1/K of the images.

Several seeds: the pooled AP is the mean over seeds on the same images (their intervals pooled as
:func:`maskssd.evaluation.bootstrap.bootstrap` pools runs). Artifacts: ``folds.json`` (every fold's image ids,
the fold seed and their digest, also the parent's tag ``data.folds_hash``), ``detections/oof_seed<S>.json``
per seed (the format and metrics of ``maskssd evaluate --save-detections``, so anyone can re-score it) and
``report/oof.json`` (the record the docs render).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from maskssd.data.folds import fold_digest
from maskssd.errors import MaskSSDError
from maskssd.evaluation.bootstrap import bootstrap, mark
from maskssd.evaluation.detections_file import doc_evalset, load_detections, write_detections
from maskssd.evaluation.records import EvalSet
from maskssd.evaluation.report import ReportSpec, finite, report_split
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.tracking import runs
from maskssd.training.build import resolve_data_root, split_annotations
from maskssd.training.config import ExperimentConfig, validate

__all__ = [
    "FOLDS_HASH_TAG",
    "download_oof",
    "fold_lists",
    "fold_run",
    "is_cv_parent",
    "log_folds",
    "oof_errors",
    "out_of_fold",
    "seeds_of",
    "union_annotations",
]

log = logging.getLogger(__name__)

#: The parent's (and each child's) tag naming its folds: two cross-validations compare iff equal.
FOLDS_HASH_TAG = "data.folds_hash"


def _fold1(cfg: ExperimentConfig) -> ExperimentConfig:
    data = cfg.model_dump(mode="json")
    data["data"]["fold"] = 1
    return validate(data, "fold 1")


def fold_lists(cfg: ExperimentConfig) -> tuple[Path, list[list[str]]]:
    """The data root and every fold's image ids of a cross-validation config (``data.folds``)."""
    root = resolve_data_root(cfg)
    folds = split_annotations(_fold1(cfg), root).folds
    assert folds is not None
    return root, folds


def union_annotations(cfg: ExperimentConfig, root: Path) -> list[Any]:
    """The train and val images together: what the folds partition."""
    data = split_annotations(_fold1(cfg), root)
    return data.splits["train"] + data.splits["val"]


def log_folds(run: runs.MlflowRun, cfg: ExperimentConfig) -> str:
    """Record a cross-validation parent's folds (``folds.json``, tag ``data.folds_hash``); their digest."""
    root, folds = fold_lists(cfg)
    d = cfg.data
    digest = fold_digest(folds, d.fold_seed)
    run.set_tags({FOLDS_HASH_TAG: digest})
    run.log_dict(
        {
            "k": d.folds,
            "fold_seed": d.fold_seed,
            "digest": digest,
            "root": str(root.resolve()),
            "folds": folds,
        },
        "folds.json",
    )
    log.info(
        "%d folds of %d images (fold seed %d, digest %s)", d.folds, sum(map(len, folds)), d.fold_seed, digest
    )
    return digest


def _seed_set(c: Any, children: Sequence[Any], union: Sequence[Any], tmp: Path) -> EvalSet:
    """One seed's out-of-fold set: its folds' validation detections, pooled; every image exactly once."""
    sets = []
    for r in children:
        path = runs.MlflowRun(c, r.run_id).download("detections/val.json", tmp / r.run_id)
        sets.append(doc_evalset(load_detections(path), union))
    oof = EvalSet.concat(sets)
    expected = {a.image_id for a in union}
    if set(oof.image_ids) != expected or len(oof) != len(expected):
        missing = sorted(expected - set(oof.image_ids))
        raise MaskSSDError(
            f"the folds' detections cover {len(oof)} of {len(expected)} train+val images"
            + (f" (missing e.g. {missing[0]!r})" if missing else "")
        )
    return oof


def out_of_fold(
    parent: runs.MlflowRun,
    cfg: ExperimentConfig,
    results: Mapping[tuple[int, int], Any],
    seeds: Sequence[int],
) -> dict[str, float]:
    """Score every train+val image once with the model that did not see it (per seed), log the pooled AP with
    its interval, each seed's detections and the record; returns the metrics logged (``oof_*``)."""
    ev, d = cfg.eval, cfg.data
    root = resolve_data_root(cfg)
    union = union_annotations(cfg, root)
    spec = ReportSpec(0, 0, ev.bootstrap_ci, ev.operating_threshold, ev.coco)
    decode = {**asdict(DecodeSpec.from_config(ev)), "run_id": parent.run_id}
    data = {  # the folds' digest too: the file can stand for its parent in a paired comparison
        "root": str(root.resolve()),
        "split_name": d.split_name,
        "splits": ["train", "val"],
        "folds": d.folds,
        "folds_hash": parent.client.get_run(parent.run_id).data.tags.get(FOLDS_HASH_TAG),
    }
    reports = {}
    with tempfile.TemporaryDirectory(prefix="maskssd-oof-") as tmp:
        for seed in seeds:
            kids = [results[(seed, k)] for k in range(1, d.folds + 1)]
            reports[seed] = report_split(_seed_set(parent.client, kids, union, Path(tmp)), spec, split="oof")
            path = write_detections(
                Path(tmp) / f"oof_seed{seed}.json",
                reports[seed].evalset,
                reports[seed].result,
                {**decode, "split": "oof", "seed": seed},
                data=data,
            )
            parent.log_artifact(path, "detections")
    boot_seed = ev.bootstrap_seed if ev.bootstrap_seed is not None else 0
    pooled = bootstrap(
        [mark(r.result.matched) for r in reports.values()],
        n=max(ev.bootstrap, 1),
        seed=boot_seed,
        ci=ev.bootstrap_ci,
    )
    metrics = {"oof_map": pooled.map.estimate, "n_oof_images": float(len(union))}
    metrics.update({f"oof_ap_{c}": iv.estimate for c, iv in pooled.ap.items()})
    metrics["oof_map_voc12"] = pooled.map_voc12.estimate
    if ev.bootstrap > 0:
        metrics.update(pooled.as_metrics("oof"))
    metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    parent.log_metrics(metrics, step=0)
    parent.log_dict(
        finite(
            {
                "seeds": list(seeds),
                "folds": d.folds,
                "fold_seed": d.fold_seed,
                "images": len(union),
                "pooled": pooled.to_dict() if ev.bootstrap > 0 else None,
                "per_seed": {str(s): r.to_dict() for s, r in reports.items()},
            }
        ),
        "report/oof.json",
    )
    interval = (  # no resamples (eval.bootstrap = 0, as in a study's trials): no interval to show
        f" [{100 * pooled.map.low:.1f}, {100 * pooled.map.high:.1f}]" if ev.bootstrap > 0 else ""
    )
    log.info(
        "out-of-fold mAP %.1f%s on %d images (%d folds x %d seeds)",
        100 * pooled.map.estimate,
        interval,
        len(union),
        d.folds,
        len(seeds),
    )
    return metrics


def fold_run(c: Any, run_id: str) -> tuple[dict[str, Any], int, int]:
    """One fold's run (a cross-validation child, or a run trained on its own with ``data.fold`` set):
    its folds (``folds.json``, ``root`` added from the run's tags), its seed and its fold ``k``; refuses a run
    that is not one, or has not finished."""
    run = c.get_run(run_id)
    try:
        fold = int(run.data.tags.get("maskssd.fold", 0))
    except ValueError:
        fold = 0
    if not fold:
        raise MaskSSDError(
            f"run {run_id} is neither a cross-validation parent nor one fold's run (the run id that maskssd "
            "train CONFIG --folds K printed, or one trained with --fold k)"
        )
    if run.info.status != "FINISHED":
        raise MaskSSDError(
            f"fold {fold}'s run {run_id} is {run.info.status}: finish it with --resume {run_id}"
        )
    with tempfile.TemporaryDirectory(prefix="maskssd-folds-") as tmp:
        try:
            folds = json.loads(runs.MlflowRun(c, run_id).download("folds.json", tmp).read_text())
        except (MaskSSDError, ValueError) as e:
            raise MaskSSDError(f"fold run {run_id} has no readable folds.json ({e})") from None
    folds.setdefault("root", run.data.tags.get("data.root"))
    seed = run.data.tags.get("maskssd.seed", run.data.params.get("experiment.seed", 0))
    return folds, int(seed), fold


def is_cv_parent(c: Any, ref: str) -> bool:
    """Whether ``ref`` names a cross-validation parent run (a file or any other run: False)."""
    if Path(ref).is_file():
        return False
    try:
        return c.get_run(ref).data.tags.get("maskssd.role") == "cv"
    except Exception:  # noqa: BLE001 - not a run of this store
        return False


def seeds_of(run: Any) -> list[int]:
    """The seeds a seeds or cross-validation parent was started with (its ``seeds`` param), in order."""
    return [int(s) for s in run.data.params.get("seeds", "").split(",") if s]


def download_oof(c: Any, ref: str, dst: str | Path) -> tuple[list[Path], str]:
    """A cross-validation parent's out-of-fold detection files (one per seed, in seed order) and its folds'
    digest; refuses a parent whose out-of-fold evaluation is not there yet."""
    run = c.get_run(ref)
    seeds = seeds_of(run)
    names = {a.path for a in c.list_artifacts(ref, "detections")}
    wanted = [f"detections/oof_seed{s}.json" for s in seeds]
    missing = [w for w in wanted if w not in names]
    if not seeds or missing:
        raise MaskSSDError(
            f"cross-validation parent {ref} has no out-of-fold detections yet ({', '.join(missing) or 'no seeds'}):"
            f" finish it with maskssd train CONFIG --resume {ref}"
        )
    mlrun = runs.MlflowRun(c, ref)
    return [mlrun.download(w, Path(dst) / ref) for w in wanted], run.data.tags.get(FOLDS_HASH_TAG, "")


def oof_errors(c: Any, run_id: str) -> dict[str, Any] | None:
    """Where a cross-validation parent's models went wrong, out of fold (its first seed, from the
    ``report/oof.json`` its run wrote): AP, recall and boxes by face size, and what every true box was called at
    the operating threshold (its confusion matrix). None for a run without that report (not a parent, or one
    not finished)."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="maskssd-oof-") as tmp:
        try:
            doc = json.loads(runs.MlflowRun(c, run_id).download("report/oof.json", tmp).read_text())
        except (MaskSSDError, ValueError):
            return None
    seed, report = next(iter(sorted(doc.get("per_seed", {}).items())), (None, None))
    errors = (report or {}).get("errors") or {}
    confusion = errors.get("confusion_at_threshold")
    if not confusion:
        return None
    return {
        "run_id": run_id,
        "seed": int(seed),
        "images": doc.get("images"),
        "folds": doc.get("folds"),
        "threshold": errors.get("threshold"),
        "labels": confusion["labels"],
        "rows_true_columns_predicted": confusion["rows_true_columns_predicted"],
        "size_measure": errors.get("size_measure"),
        "size_buckets": [{"key": b["key"], "label": b["label"]} for b in errors.get("size_buckets", [])],
        "n_gt_by_size": errors.get("n_gt"),
        "ap_by_size": errors.get("ap_by_size"),
        "map_by_size": errors.get("map_by_size"),
        "recall_by_size": errors.get("recall_at_threshold"),
    }
