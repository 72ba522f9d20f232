"""``maskssd evaluate --model CV_PARENT --split oof``: a cross-validation parent scored out of fold again, each
fold's model on its own fold's images, with this command's inference settings (``--tta-hflip``, decoding,
backend). An inference-only lever is then judged like a trained one, paired with ``maskssd compare FILE
PARENT`` on the same folds, with no retraining. ``--model FOLD_RUN``: one fold's run, on its fold only (a fold
file: ``maskssd compare`` joins the folds' files into the out-of-fold set)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskssd.cli.console import err
from maskssd.errors import MaskSSDError


def score_oof(
    a: argparse.Namespace, decode: Any, options: Callable[[argparse.Namespace, str], dict[str, Any]]
) -> tuple[Any, Any, str, dict[str, Any]]:
    """``(the last fold's predictor, the pooled out-of-fold EvalSet, a title, the file's data block)``;
    ``options``: the predictor keywords of the command's inference options."""
    from maskssd.cli.evaluate_more import score
    from maskssd.data import DataReport, load_split
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.deploy.predictor import load_predictor
    from maskssd.evaluation.records import EvalSet
    from maskssd.tracking.folds import fold_run, is_cv_parent
    from maskssd.tracking.runs import client
    from maskssd.tracking.seeds import fold_models

    c = client(a.tracking_uri, create=False)
    if is_cv_parent(c, a.model):
        folds, seed, children = fold_models(c, a.model)
        ks = list(range(1, int(folds["k"]) + 1))
    else:  # one fold's run (refused, saying why, if it is not one)
        folds, seed, k = fold_run(c, a.model)
        children, ks = [a.model], [k]
    a.split_name = a.split_name or c.get_run(a.model).data.params.get("data.split_name", "paper")
    a.data = a.data or folds["root"]
    if not Path(a.data).is_dir():
        raise MaskSSDError(f"the folds' images were at {a.data}, which is not here: pass --data ROOT")
    sets, pred, union = [], None, None
    for k, child in zip(ks, children, strict=True):
        ckpt = resolve_checkpoint(f"runs:/{child}/checkpoints/best.pt", a.tracking_uri)
        pred = load_predictor(
            ckpt, device=a.device, backend=a.backend, auto_int8=False, **options(a, a.split_name)
        )
        if union is None:  # what the folds partition: the train and val images together
            report = DataReport()
            union = {
                x.image_id: x
                for s in ("train", "val")
                for x in load_split(a.data, s, a.split_name, pred.class_names, a.on_error, report)
            }
        lost = [i for i in folds["folds"][k - 1] if i not in union]
        if lost:
            raise MaskSSDError(f"fold {k}'s image {lost[0]!r} is not in {a.data} {a.split_name}/train+val")
        anns = [union[i] for i in folds["folds"][k - 1]]
        evalset = score(a, pred, anns, decode, prefix="oof")
        sets.append(evalset)
        err.print(f"fold {k}: the model of run {child[:12]} on its {len(anns)} images", highlight=False)
    pooled = EvalSet.concat(sets)
    data = {
        "root": str(Path(a.data).resolve()),
        "split_name": a.split_name,
        "splits": ["train", "val"],
        "folds": int(folds["k"]),
        "folds_hash": folds["digest"],
        "fold_seed": folds.get("fold_seed"),
        "seed": seed,
        **({"fold": ks[0]} if len(ks) == 1 and len(ks) < int(folds["k"]) else {}),
    }
    what = f"{folds['k']} folds" if len(ks) > 1 else f"fold {ks[0]} of {folds['k']}"
    title = f"{a.model} out of fold: {what} x seed {seed} ({len(pooled)} images)"
    return pred, pooled, title, data
