"""``maskssd evaluate`` beyond the AP table: per-class operating thresholds (``--fit-thresholds [--out]``) and
the results as JSON (``--json``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from maskssd.cli.console import err, out
from maskssd.errors import MaskSSDError


def check_args(a: argparse.Namespace) -> None:
    """Refuse threshold options that cannot mean anything, before any work."""
    if a.out and not a.fit_thresholds:
        raise MaskSSDError("--out writes the model with fitted thresholds: add --fit-thresholds")
    if a.fit_thresholds and a.split != "val":
        raise MaskSSDError(
            f"--fit-thresholds fits on the validation split (--split val), not {a.split}: thresholds chosen "
            "on the test split would leak it into the model"
        )


def score(a: argparse.Namespace, pred: Any, anns: list[Any], decode: Any, prefix: str | None = None) -> Any:
    """The predictor's detections on ``anns`` (an :class:`~maskssd.evaluation.records.EvalSet`), decoded with
    ``decode``, with the command's batch size, workers, device and ``--tta-hflip``."""
    import torch

    from maskssd.data import FaceMaskDataset
    from maskssd.data.transforms import eval_transform
    from maskssd.deploy.predictor import PredictorModule
    from maskssd.training.build import build_loader
    from maskssd.training.predict import predict

    ds = FaceMaskDataset(anns, eval_transform(pred.input_size), pred.class_names)
    _, evalset = predict(
        PredictorModule(pred),
        build_loader(ds, a.batch_size, a.workers),
        class_names=pred.class_names,
        device=torch.device(a.device),
        decode=decode,
        prefix=prefix or a.split,
        tta_hflip=a.tta_hflip,
    )
    assert evalset is not None
    return evalset


def fit_thresholds(a: argparse.Namespace, ckpt_path: Path, pred: Any, fits: dict[str, Any]) -> dict[str, Any]:
    """Show the per-class F1-maximising thresholds fitted on the evaluated (validation) detections; write
    ``--out``."""
    from maskssd.evaluation.thresholds import thresholds_of
    from maskssd.ssd.checkpoint import with_thresholds

    written = with_thresholds(ckpt_path, thresholds_of(fits), a.out) if a.out else None
    if not a.json:
        t = Table(title="operating thresholds: per class, the score maximising F1 at IoU > 0.5 on val")
        for col in ("class", "threshold", "F1", "precision", "recall", "objects"):
            t.add_column(col, justify="right" if col != "class" else "left")
        for c in pred.class_names:
            f = fits.get(c)
            if f is None:
                t.add_row(c, "-", "-", "-", "-", "no true positive: the default applies")
            else:
                cells = (f.threshold, f.f1, f.precision, f.recall)
                t.add_row(c, *[f"{v:.3f}" for v in cells], str(f.n_gt))
        out.print(t)
        if written:
            out.print(f"wrote {written}: detect and serve use these thresholds by default", highlight=False)
        else:
            err.print("add --out NEW.pt to write the model with these thresholds", highlight=False)
    return {"fits": {c: asdict(f) for c, f in fits.items()}, "out": str(written) if written else None}


def evaluation_doc(a: argparse.Namespace, pred: Any, report: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The evaluation as one JSON document (NaN as null): the split's report (what a run writes as
    ``report/<split>.json``) with the model and data it was made from."""
    from maskssd.evaluation.report import finite

    doc = {
        "model": str(a.model),
        "backend": pred.backend,
        "data": str(a.data),
        "split_name": a.split_name,
        **report.to_dict(),
        **extra,
    }
    return finite(doc)


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=1))


def write_record(a: argparse.Namespace, doc: dict[str, Any], started: float) -> None:
    """``--record FILE``: the evaluation with the machine, the commit and the wall time."""
    from maskssd.provenance import make_record
    from maskssd.provenance import write_record as write

    title = f"{a.model} on {a.split_name}/{a.split}"
    path = write(a.record, make_record("evaluate", doc, title=title, started=started))
    err.print(f"record written to {path}", highlight=False)


def data_of_model(a: argparse.Namespace, ckpt_path: str | Path) -> None:
    """``--data`` and ``--split-name`` when not given: the dataset and split list the model was trained on (its
    checkpoint's config), said on stderr; a model without them (an imported SSD300) needs ``--data``."""
    from maskssd.ssd.checkpoint import load

    if a.data is not None and a.split_name is not None:
        return
    trained = (load(ckpt_path).get("config") or {}).get("data") or {}
    if a.split_name is None:
        a.split_name = trained.get("split_name", "paper")
    if a.data is None:
        root = trained.get("root")
        if not root:
            raise MaskSSDError(f"{a.model} does not say which data it was trained on: pass --data ROOT")
        if not Path(root).is_dir():
            raise MaskSSDError(
                f"{a.model} was trained on {root}, which is not here (from {Path.cwd()}): pass --data ROOT"
            )
        a.data = root
        err.print(f"data: {root} {a.split_name}/{a.split} (what the model was trained on)", highlight=False)
