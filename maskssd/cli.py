"""``maskssd``: one command line for data, training, evaluation, studies, promotion and serving.

Errors caused by input (a bad config key, a malformed annotation, a missing model) print one clear message
naming the file and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskssd.errors import MaskSSDError
from maskssd.runtime import tune_cpu_allocator

out = Console()
err = Console(stderr=True)

EPILOG_MAIN = """\
examples:
  maskssd data synth /tmp/synth --images 200          # a synthetic face-mask dataset (VOC layout)
  maskssd data stats ../shared/data/face-mask-detection --split paper
  maskssd train experiments/quickstart.toml            # train, evaluate, log everything to MLflow
  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
  maskssd runs --experiment quickstart                 # compare runs in the terminal
  maskssd study studies/quickstart.toml                # an Optuna study, each trial an MLflow run
  maskssd promote --study quickstart                   # register the best trial, move @champion
  maskssd detect --model models:/maskssd-face-mask@champion --source photo.jpg --out out/
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=110)


# ---------------------------------------------------------------------------------------------- data
def cmd_data_synth(a: argparse.Namespace) -> int:
    from maskssd.synth import generate

    s = generate(a.out, n_images=a.images, seed=a.seed, split_name=a.split_name)
    out.print(f"wrote {s.images} synthetic images to {s.root} (split {s.split_name!r}: {s.split_sizes}); boxes: {s.boxes}")
    return 0


def cmd_data_split(a: argparse.Namespace) -> int:
    from maskssd.data import DEFAULT_CLASSES, load_annotations, stratified_split, write_split

    classes = a.classes or list(DEFAULT_CLASSES)
    anns = load_annotations(a.root, None, classes, a.on_error)
    parts = stratified_split(anns, a.ratios, a.seed, len(classes))
    path = write_split(a.root, a.name, parts)
    out.print(f"wrote {path}: train {len(parts[0])}, val {len(parts[1])}, test {len(parts[2])} images (seed {a.seed})")
    return 0


def cmd_data_stats(a: argparse.Namespace) -> int:
    from maskssd.data import (
        DEFAULT_CLASSES,
        DataReport,
        VOCLayout,
        box_size_histogram,
        class_counts,
        load_annotations,
        relative_area_quantiles,
    )

    classes = a.classes or list(DEFAULT_CLASSES)
    layout = VOCLayout.detect(a.root)
    report = DataReport()
    anns = load_annotations(a.root, None, classes, a.on_error, report, verify_images=a.verify)
    by_id = {x.image_id: x for x in anns}
    groups: list[tuple[str, list]] = [("all", anns)]
    split_names = [a.split] if a.split else layout.split_names()
    for name in split_names:
        for split in ("train", "val", "test"):
            ids = layout.read_split(name, split) if (a.split or layout.split_file(name, split).is_file()) else []
            missing = [i for i in ids if i not in by_id]
            if missing and a.on_error == "raise":
                raise MaskSSDError(f"{layout.split_file(name, split)}: {len(missing)} ids have no valid annotation "
                                   f"(first: {missing[0]})")
            groups.append((f"{name}/{split}", [by_id[i] for i in ids if i in by_id]))

    t = Table(title=f"{a.root} ({layout.kind} layout)")
    t.add_column("split")
    t.add_column("images", justify="right")
    for c in classes:
        t.add_column(c, justify="right")
    t.add_column("boxes", justify="right")
    for name, group in groups:
        counts = class_counts(group, classes)
        t.add_row(name, str(len(group)), *[str(counts[c]) for c in classes], str(sum(counts.values())))
    out.print(t)

    h = box_size_histogram(anns)
    q10, q50, q90 = relative_area_quantiles(anns)
    t2 = Table(title="box sizes (shorter side, original pixels)")
    for k in h:
        t2.add_column(k, justify="right")
    t2.add_row(*[str(v) for v in h.values()])
    out.print(t2)
    out.print(f"box area / image area: 10% {100 * q10:.2f}%, median {100 * q50:.2f}%, 90% {100 * q90:.2f}%")

    t3 = Table(title="problems found and fixed")
    t3.add_column("what")
    t3.add_column("count", justify="right")
    for k, v in report.summary().items():
        t3.add_row(k.replace("_", " "), str(v))
    out.print(t3)
    for path, what in report.fixes[: a.show_fixes]:
        out.print(f"  fixed  {escape(path)}: {escape(what)}", highlight=False)
    for path, why in report.skipped[: a.show_fixes]:
        out.print(f"  [red]skipped[/] {escape(path)}: {escape(why)}", highlight=False)
    return 0


def cmd_data_anchors(a: argparse.Namespace) -> int:
    import math

    from maskssd.anchors import (
        evaluate_priors,
        fit_anchors,
        layout_from_config,
        layout_from_size,
        normalized_boxes,
    )
    from maskssd.data import DEFAULT_CLASSES, load_split

    if a.config:
        if a.input_size is not None or a.levels is not None or a.min_stride is not None:
            raise MaskSSDError("--config gives the input size and the maps; change them with --set model.KEY=VALUE "
                               "(e.g. --set model.input_size=320), not --input-size/--levels/--min-stride")
        layout = layout_from_config(a.config, a.set or [])
    else:
        if a.set:
            raise MaskSSDError("--set overrides a --config; there is none")
        layout = layout_from_size(a.input_size or 384, a.levels or 6, a.min_stride or 8)
    current = layout.current
    num_ratios = a.ratios if a.ratios is not None else (len(current.aspect_ratios[0]) if current else 3)
    anns = load_split(a.root, a.split, a.split_name, a.classes or list(DEFAULT_CLASSES), a.on_error)
    boxes = normalized_boxes(anns)
    if len(boxes) == 0:
        raise MaskSSDError(f"{a.root}: split {a.split_name}/{a.split} has no boxes to fit default boxes to")
    size = layout.input_size
    fit = fit_anchors(boxes, layout.feature_maps, size, num_ratios)
    cur = evaluate_priors(boxes, current, size) if current is not None else None

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.1f}%"

    t = Table(title=f"default boxes for {layout.source}: {len(boxes)} {a.split} boxes of {a.split_name}, "
                    f"recall = best prior IoU >= {fit.threshold:g}", title_justify="left")
    for col in ("level", "map", "stride"):
        t.add_column(col, justify="right")
    if cur is not None:
        for col in ("current scale", "share", "recall"):
            t.add_column(col, justify="right", style="dim")
    for col in ("fitted scale", "share", "recall"):
        t.add_column(col, justify="right")
    for k, f in enumerate(layout.feature_maps):
        row = [str(k), f"{f}x{f}", f"{size / f:.0f}"]
        if cur is not None:
            row += [f"{current.scales[k]:.4g}", pct(cur.level_share[k]), pct(cur.level_recall[k])]
        row += [f"{fit.scales[k]:.4g}", pct(fit.stats.level_share[k]), pct(fit.stats.level_recall[k])]
        t.add_row(*row)
    t.add_section()
    row = ["all", "", ""]
    if cur is not None:
        row += ["", "", f"[bold]{pct(cur.recall)}"]
    row += ["", "", f"[bold]{pct(fit.stats.recall)}"]
    t.add_row(*row)
    out.print(t)
    lines = [("" if cur is None else f"aspect ratios besides 1: current {list(current.aspect_ratios[0])}; ")
             + f"fitted {list(fit.aspect_ratios)}",
             f"matcher recall: fitted {pct(fit.stats.recall)} (mean best IoU {fit.stats.mean_best_iou:.3f})"
             + (f", current {pct(cur.recall)} (mean best IoU {cur.mean_best_iou:.3f})" if cur else "")
             + f"; quantile start of the fit {pct(fit.quantile_stats.recall)}",
             f"boxes under {fit.stats.small_px:g} px at {size} px ({fit.stats.small_boxes}): recall fitted "
             f"{pct(fit.stats.small_recall)}" + (f", current {pct(cur.small_recall)}" if cur else ""),
             *fit.notes]
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    header = (f"# maskssd data anchors: {len(boxes)} boxes of {a.split_name}/{a.split}, maps "
              f"{list(layout.feature_maps)} at {size} px; matcher recall {pct(fit.stats.recall)}"
              + (f" (current {pct(cur.recall)})" if cur else "") + "\n")
    snippet = header + fit.toml()
    out.print("\n[model]\n" + snippet, highlight=False, markup=False, soft_wrap=True)
    if a.out:
        path = Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(snippet)
        out.print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------- train
def cmd_train(a: argparse.Namespace) -> int:
    from maskssd.config import load_config
    from maskssd.errors import TrainingInterrupted
    from maskssd.runner import run_experiment

    cfg = load_config(a.config, a.set or [])
    if a.nproc and a.nproc > 1:
        from maskssd.distributed import launch

        return launch(a)
    try:
        r = run_experiment(cfg, tracking_uri=a.tracking_uri, run_name=a.run_name, resume_run_id=a.resume,
                           progress=not a.no_progress)
    except TrainingInterrupted:
        return 130
    out.print(f"[green]run {r.run_id} finished[/]; model: runs:/{r.run_id}/model")
    return 0


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint FILE, runs:/RUN_ID/model, or models:/NAME@ALIAS (e.g. models:/maskssd-face-mask@champion)")
    p.add_argument("--tracking-uri", help="MLflow store for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI or mlruns/)")


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from maskssd.data import DataReport, FaceMaskDataset, load_split
    from maskssd.engine import evaluate
    from maskssd.metrics import EvalResult
    from maskssd.postprocess import DecodeSpec
    from maskssd.registry import load_predictor
    from maskssd.runner import build_loader
    from maskssd.transforms import eval_transform

    pred = load_predictor(a.model, a.tracking_uri, a.device)
    decode = DecodeSpec(a.min_score, a.max_overlap, a.top_k, a.class_agnostic)  # the paper protocol by default
    anns = load_split(a.data, a.split, a.split_name, pred.class_names, a.on_error, DataReport())
    ds = FaceMaskDataset(anns, eval_transform(pred.input_size), pred.class_names)
    loader = build_loader(ds, a.batch_size, a.workers, 0, False)
    collected: list[tuple[str, Any]] = []
    _, result = evaluate(pred.model, loader, None, pred.class_names, torch.device(a.device), decode, True, True,
                         prefix=a.split, collect=collected)
    assert isinstance(result, EvalResult)
    t = Table(title=f"{a.model} on {a.data} {a.split_name}/{a.split} ({len(ds)} images)")
    for col in ("class", "AP (VOC07)", "AP (all-point)", "AP (COCO .5:.95)", "objects"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for c in pred.class_names:
        t.add_row(c, f"{100 * result.ap[c]:.1f}", f"{100 * result.ap_voc12[c]:.1f}",
                  f"{100 * result.ap_coco.get(c, float('nan')):.1f}", str(result.n_gt[c]))
    t.add_row("[bold]mean", f"[bold]{100 * result.map:.1f}", f"{100 * result.map_voc12:.1f}",
              f"{100 * result.map_coco:.1f}", "")
    out.print(t)
    out.print(f"COCO AP50: {100 * result.ap50_coco:.1f}")
    if a.save_detections:
        sizes = {x.image_id: (x.width, x.height) for x in anns}
        doc = {
            "classes": list(pred.class_names),
            "images": [{"id": i, "width": sizes[i][0], "height": sizes[i][1], "detections": d.to_list(pred.class_names)}
                       for i, d in collected],
            "metrics": {"map": result.map, "ap": result.ap, "map_voc12": result.map_voc12,
                        "map_coco": result.map_coco, "ap50_coco": result.ap50_coco},
            "settings": {"min_score": decode.min_score, "max_overlap": decode.max_overlap, "top_k": decode.top_k,
                         "class_agnostic": decode.class_agnostic, "model": str(a.model), "split": a.split},
        }
        Path(a.save_detections).parent.mkdir(parents=True, exist_ok=True)
        Path(a.save_detections).write_text(json.dumps(doc, indent=1))
        out.print(f"detections written to {a.save_detections}")
    return 0


def cmd_detect(a: argparse.Namespace) -> int:
    from maskssd.detect import run_detect

    return run_detect(a)


def cmd_runs(a: argparse.Namespace) -> int:
    from maskssd import tracking

    c = tracking.client(a.tracking_uri)
    runs = tracking.runs_table(c, a.experiment, max_results=a.limit)
    if not runs:
        out.print("no runs")
        return 0
    classes = sorted({k.removeprefix("best_val_ap_") for r in runs for k in r.data.metrics if k.startswith("best_val_ap_")})
    rows = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        rows.append({
            "run": r.info.run_id[:8], "name": r.info.run_name or "", "status": r.info.status,
            "model": p.get("model.name", ""), "lr": p.get("optim.lr", ""), "alpha": p.get("loss.alpha", ""),
            "neg/pos": p.get("loss.neg_pos_ratio", ""), "epochs": p.get("train.epochs", ""),
            "val_map": m.get("best_val_map", m.get("val_map")), "test_map": m.get("test_map"),
            **{f"AP {c}": m.get(f"best_val_ap_{c}") for c in classes},
        })
    key = a.sort
    if key:
        if key not in rows[0]:
            raise MaskSSDError(f"cannot sort by {key!r}; columns: {', '.join(rows[0])}")
        rows.sort(key=lambda r: (r[key] is None, -(r[key] or 0) if isinstance(r[key], float) else str(r[key])))
    t = Table(title=f"runs ({a.experiment or 'all experiments'})")
    for col in rows[0]:
        t.add_column(col, justify="right" if col not in ("run", "name", "status", "model") else "left",
                     no_wrap=col == "run", min_width=8 if col == "run" else None)
    for r in rows:
        t.add_row(*[("" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)) for v in r.values()])
    out.print(t)
    return 0


# --------------------------------------------------------------------------------------- studies etc.
def cmd_study(a: argparse.Namespace) -> int:
    from maskssd.studies import run_study

    return run_study(a)


def cmd_study_report(a: argparse.Namespace) -> int:
    from maskssd.studies import report_study

    return report_study(a)


def cmd_promote(a: argparse.Namespace) -> int:
    from maskssd import registry, tracking

    if a.study:
        from maskssd.studies import best_trial_run

        run_id, extra = best_trial_run(a.study, a.storage, a.tracking_uri)
        metric = a.metric or "best_val_map"
    elif a.run:
        run_id, extra, metric = a.run, {}, a.metric or "best_val_map"
    else:
        if not (a.experiment and a.metric):
            raise MaskSSDError("say which run: --study NAME, --run RUN_ID, or --experiment NAME --metric M")
        c = tracking.client(a.tracking_uri)
        run_id, extra, metric = registry.best_run(c, a.experiment, a.metric, not a.minimize), {}, a.metric
    p = registry.promote(run_id, a.name, metric, not a.minimize, a.force, a.tracking_uri, extra)
    verdict = "[green]moved @champion to it[/]" if p.moved_alias else "[yellow]kept @champion[/]"
    out.print(f"registered {p.name} version {p.version} from run {p.run_id} ({p.metric} = {p.value:.4f}); "
              f"{verdict}: {p.reason}")
    out.print(f"use it: --model models:/{p.name}@{registry.CHAMPION}" if p.moved_alias else
              f"use it: --model models:/{p.name}/{p.version}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from maskssd.serving import serve_main

    return serve_main(a)


def cmd_stream(a: argparse.Namespace) -> int:
    from maskssd.video import stream_main

    return stream_main(a)


def cmd_export(a: argparse.Namespace) -> int:
    from maskssd.export import export_main

    return export_main(a)


def cmd_models(a: argparse.Namespace) -> int:
    from maskssd.models import list_models

    for m in list_models():
        out.print(m)
    return 0


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskssd", description=__doc__.split("\n")[0], epilog=EPILOG_MAIN,
                                formatter_class=_formatter)
    from maskssd import __version__

    p.add_argument("--version", action="version", version=f"maskssd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # data
    d = sub.add_parser("data", help="datasets: synthesise, split, inspect", formatter_class=_formatter,
                       description="Work with Pascal VOC face-mask datasets (Kaggle images/+annotations/ or classic VOC).")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = dsub.add_parser("synth", help="generate a synthetic face-mask dataset", formatter_class=_formatter,
                        description="Draw scenes of faces with a mask, without one, or with one below the nose, in the "
                                    "real class imbalance; written in the Kaggle VOC layout with a stratified split.",
                        epilog="example:\n  maskssd data synth /tmp/synth --images 200 --seed 0 && maskssd data stats /tmp/synth")
    s.add_argument("out", help="output folder (new, empty, or an earlier synthetic dataset)")
    s.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same dataset (default 0)")
    s.add_argument("--split-name", default="default", help="written to OUT/splits/NAME/ (default: default)")
    s.set_defaults(func=cmd_data_synth)

    s = dsub.add_parser("split", help="write a seeded stratified train/val/test split", formatter_class=_formatter,
                        description="Iterative stratification: every split gets its share of every class.",
                        epilog="example:\n  maskssd data split /tmp/synth --name seed1 --seed 1")
    s.add_argument("root")
    s.add_argument("--name", required=True, help="written to ROOT/splits/NAME/{train,val,test}.txt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--classes", nargs="+", help="class names (default: with_mask without_mask mask_weared_incorrect)")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    s.set_defaults(func=cmd_data_split)

    s = dsub.add_parser("stats", help="images and boxes per class and split, box sizes, problems fixed",
                        formatter_class=_formatter,
                        epilog="example:\n  maskssd data stats ../shared/data/face-mask-detection --split paper")
    s.add_argument("root")
    s.add_argument("--split", help="split name under ROOT/splits/ (default: every split found)")
    s.add_argument("--classes", nargs="+")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="skip: count bad samples instead of stopping at the first")
    s.add_argument("--show-fixes", type=int, default=20, metavar="N", help="list the first N fixes (default 20)")
    s.add_argument("--verify", action="store_true", help="decode every image (finds truncated files; slower)")
    s.set_defaults(func=cmd_data_stats)

    s = dsub.add_parser("anchors", help="fit default-box scales and aspect ratios to a split's boxes",
                        formatter_class=_formatter,
                        description="Fit per-level scales and aspect ratios of the default boxes to the boxes of a "
                                    "split (as the model sees them, squashed into the square input), and compare "
                                    "the matcher's recall (share of boxes whose best prior has IoU >= 0.5) with the "
                                    "config's current boxes. Prints [model] lines for the config.",
                        epilog="examples:\n"
                               "  maskssd data anchors ../shared/data/face-mask-detection --split-name paper "
                               "--config experiments/cpu_effnet_lite0.toml --out /tmp/anchors.toml\n"
                               "  maskssd data anchors ../shared/data/face-mask-detection --split-name paper "
                               "--config experiments/cpu_effnet_lite0.toml --set model.neck=fpn "
                               "--set model.stride4=true\n"
                               "  maskssd data anchors /tmp/synth --split-name default --input-size 320 --levels 6")
    s.add_argument("root")
    s.add_argument("--split-name", required=True, help="split list under ROOT/splits/")
    s.add_argument("--split", default="train", choices=("train", "val", "test"), help="default: train")
    s.add_argument("--config", help="experiment TOML: input size, maps and current boxes from its model")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a --config value (repeatable)")
    s.add_argument("--input-size", type=int, help="without --config: square input size (default 384)")
    s.add_argument("--levels", type=int, help="without --config: number of feature maps (default 6)")
    s.add_argument("--min-stride", type=int, choices=(4, 8), help="without --config: stride of the finest map (default 8)")
    s.add_argument("--ratios", type=int, help="aspect ratios besides 1 (default: the config's count, else 3)")
    s.add_argument("--out", help="write the [model] lines (scales, aspect_ratios) to this file")
    s.add_argument("--classes", nargs="+")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    s.set_defaults(func=cmd_data_anchors)

    # train
    t = sub.add_parser("train", help="train + evaluate one experiment, tracked in MLflow", formatter_class=_formatter,
                       description="Train the model of an experiment config, evaluate it every train.eval_every epochs, "
                                   "keep last/best checkpoints, evaluate the best on the final split and log params, "
                                   "metrics, checkpoints, plots and the model to MLflow.",
                       epilog="examples:\n  maskssd train experiments/quickstart.toml\n"
                              "  maskssd train experiments/quickstart.toml --set optim.lr=1e-3 --set loss.alpha=2\n"
                              "  maskssd train experiments/quickstart.toml --resume RUN_ID   # after Ctrl-C / SIGTERM\n"
                              "  MLFLOW_TRACKING_URI=http://mlflow:5000 maskssd train experiments/paper_ssd300.toml")
    t.add_argument("config", help="experiment TOML (see experiments/)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    t.add_argument("--run-name")
    t.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    t.add_argument("--tracking-uri", help="MLflow store or server (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun underneath)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    t.set_defaults(func=cmd_train)

    # evaluate
    e = sub.add_parser("evaluate", help="per-class AP and mAP of a model on a split", formatter_class=_formatter,
                       description="The paper's protocol (VOC07 11-point AP at IoU > 0.5, difficult ignored, detections "
                                   "at min_score 0.01, NMS 0.45, top_k 200), plus all-point and COCO mAP.",
                       epilog="example:\n  maskssd evaluate --model models:/maskssd-face-mask@champion \\\n"
                              "      --data ../shared/data/face-mask-detection --split val --save-detections dets.json")
    _model_arg(e)
    e.add_argument("--data", required=True, help="dataset root")
    e.add_argument("--split", choices=("train", "val", "test"), default="val")
    e.add_argument("--split-name", default="paper", help="split list under ROOT/splits/ (default: paper)")
    e.add_argument("--save-detections", metavar="FILE.json", help="write every detection (original pixels) and the metrics")
    e.add_argument("--min-score", type=float, default=0.01)
    e.add_argument("--max-overlap", type=float, default=0.45)
    e.add_argument("--top-k", type=int, default=200)
    e.add_argument("--class-agnostic", action="store_true", help="NMS across classes (one class per face)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    e.set_defaults(func=cmd_evaluate)

    # detect
    de = sub.add_parser("detect", help="annotate images, a folder, a video, a camera or a stream URL",
                        formatter_class=_formatter,
                        description="Detect faces and mask use; writes annotated images/video and JSON detections "
                                    "(with_mask green, mask_weared_incorrect yellow, without_mask red).",
                        epilog="examples:\n  maskssd detect --model runs:/RUN_ID/model --source photos/ --out out/\n"
                               "  maskssd detect --model models:/maskssd-face-mask@champion --source clip.mp4 --out out/\n"
                               "  maskssd detect --model model.pt --source 0 --out out/ --max-frames 300   # webcam 0")
    _model_arg(de)
    de.add_argument("--source", required=True, help="IMAGE, DIR, VIDEO file, CAMERA_INDEX or stream URL (rtsp://, http://)")
    de.add_argument("--out", required=True, help="output folder")
    de.add_argument("--min-score", type=float, default=0.4, help="draw and report detections above this score (default 0.4)")
    de.add_argument("--max-overlap", type=float, default=None, help="NMS IoU (default: the model's)")
    de.add_argument("--class-agnostic", action="store_true", help="one class per face: NMS across classes")
    de.add_argument("--smooth", type=int, default=0, metavar="FRAMES",
                    help="video: vote each face's class over the last FRAMES frames (0 = off)")
    de.add_argument("--max-frames", type=int, default=0, help="video/camera: stop after N frames (0 = all)")
    de.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    de.add_argument("--device", default="cpu")
    de.add_argument("--show", action="store_true", help="show frames in a window (needs a display)")
    de.set_defaults(func=cmd_detect)

    # runs
    r = sub.add_parser("runs", help="compare runs in a table", formatter_class=_formatter,
                       epilog="example:\n  maskssd runs --experiment quickstart --sort val_map")
    r.add_argument("--experiment")
    r.add_argument("--sort", help="column to sort by (e.g. val_map, test_map, status)")
    r.add_argument("--limit", type=int, default=50)
    r.add_argument("--tracking-uri")
    r.set_defaults(func=cmd_runs)

    # study
    st = sub.add_parser("study", help="run (or resume) an Optuna study; each trial an MLflow run",
                        formatter_class=_formatter,
                        description="Search MultiBox loss and learning-rate parameters. Running the same command again "
                                    "resumes the study; several workers may share one storage.",
                        epilog="examples:\n  maskssd study studies/quickstart.toml\n"
                               "  maskssd study studies/paper_multibox.toml --storage postgresql://user:pw@db/optuna  # on each worker")
    st.add_argument("config", help="study TOML (see studies/)")
    st.add_argument("--n-trials", type=int, help="trials for this worker (default: the config's)")
    st.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db)")
    st.add_argument("--study-name", help="default: the config's study.name")
    st.add_argument("--tracking-uri")
    st.add_argument("--timeout", type=float, help="seconds for this worker")
    st.add_argument("--no-report", action="store_true", help="skip the closing report and plots")
    st.set_defaults(func=cmd_study)

    sr = sub.add_parser("study-report", help="best trials, parameter importances and plots of a study",
                        formatter_class=_formatter)
    sr.add_argument("name")
    sr.add_argument("--storage")
    sr.add_argument("--tracking-uri")
    sr.set_defaults(func=cmd_study_report)

    # promote
    pr = sub.add_parser("promote", help="register a run's model; move @champion if it is better",
                        formatter_class=_formatter,
                        epilog="examples:\n  maskssd promote --study quickstart\n  maskssd promote --run RUN_ID --force\n"
                               "  maskssd promote --experiment quickstart --metric best_val_map")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", help="the best trial of this Optuna study")
    g.add_argument("--run", help="this MLflow run")
    g.add_argument("--experiment", help="the best run of this experiment by --metric")
    pr.add_argument("--metric", help="selection metric (default best_val_map)")
    pr.add_argument("--minimize", action="store_true", help="lower is better for --metric")
    pr.add_argument("--name", default="maskssd-face-mask", help="registered model name")
    pr.add_argument("--force", action="store_true", help="move @champion even if the new version is not better")
    pr.add_argument("--storage", help="Optuna storage of --study")
    pr.add_argument("--tracking-uri")
    pr.set_defaults(func=cmd_promote)

    # serve / stream / export
    sv = sub.add_parser("serve", help="HTTP detection service with dynamic batching", formatter_class=_formatter,
                        epilog="example:\n  maskssd serve --model models:/maskssd-face-mask@champion --port 8000\n"
                               "  curl -F file=@photo.jpg http://127.0.0.1:8000/detect")
    _model_arg(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8)
    sv.add_argument("--max-wait-ms", type=float, default=10.0)
    sv.add_argument("--no-batching", action="store_true")
    sv.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    sv.add_argument("--montage", metavar="FILE.jpg", help="keep a montage of the latest frame of every camera here")
    sv.add_argument("--min-score", type=float, default=0.4)
    sv.add_argument("--class-agnostic", action="store_true")
    sv.set_defaults(func=cmd_serve)

    sm = sub.add_parser("stream", help="camera client: send frames to a maskssd server", formatter_class=_formatter,
                        epilog="example:\n  maskssd stream --server http://10.0.0.5:8000 --source 0 --name door")
    sm.add_argument("--server", required=True)
    sm.add_argument("--source", required=True, help="CAMERA_INDEX, VIDEO file or stream URL")
    sm.add_argument("--name", default="cam1")
    sm.add_argument("--max-frames", type=int, default=0)
    sm.add_argument("--fps", type=float, default=0, help="cap the frame rate (0 = as fast as the server answers)")
    sm.add_argument("--jpeg-quality", type=int, default=85)
    sm.set_defaults(func=cmd_stream)

    ex = sub.add_parser("export", help="export a model to ONNX or TorchScript", formatter_class=_formatter,
                        epilog="example:\n  maskssd export --model runs:/RUN_ID/model --format onnx --out model.onnx")
    _model_arg(ex)
    ex.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=cmd_export)

    mo = sub.add_parser("models", help="list the model names a config may use")
    mo.set_defaults(func=cmd_models)
    _threads_arg(t, e, de, st, sv, ex)
    return p


def _threads_arg(*parsers: argparse.ArgumentParser) -> None:
    for p in parsers:
        p.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads (default: all cores). Several processes on one machine (study "
                            "workers, servers) run far better with cores / processes each than oversubscribed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # keep freed memory: ~1.8x faster CPU training steps (see maskssd.runtime)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except MaskSSDError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
