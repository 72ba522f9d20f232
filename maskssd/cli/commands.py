"""The subcommands: each turns parsed arguments into library calls and prints the results (rich tables).

Errors caused by input (a bad config key, a malformed annotation, a missing model) are MaskSSDErrors: the
entry point prints one clear message naming the file and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskssd.errors import MaskSSDError
from maskssd.ssd.decode_spec import DecodeSpec

out = Console()
err = Console(stderr=True)
#: Detections drawn and reported by ``detect`` and ``serve`` (the decode threshold for AP is DecodeSpec.min_score).
DISPLAY_THRESHOLD = 0.4


# --------------------------------------------------------------------------------------------- train
def cmd_train(a: argparse.Namespace) -> int:
    from maskssd.ssd.warmup import compile_in_background

    # first of all: a fresh install compiles its CPU kernels in a child process while this one imports torch and
    # MLflow, opens the run and prepares the data, instead of at the first training step
    compile_in_background()
    from maskssd.errors import TrainingInterrupted
    from maskssd.tracking.experiment import run_experiment
    from maskssd.training.config import load_config

    cfg = load_config(a.config, a.set or [])
    if a.nproc and a.nproc > 1:
        from maskssd.training.distributed import launch

        return launch(a.nproc, list(a.argv))
    try:
        r = run_experiment(
            cfg,
            tracking_uri=a.tracking_uri,
            run_name=a.run_name,
            resume_run_id=a.resume,
            progress=not a.no_progress,
        )
    except TrainingInterrupted as e:
        err.print(
            f"[yellow]{escape(str(e))}; checkpoint saved.[/] Resume with:\n  maskssd train {a.config} --resume "
            f"{e.run_id}" + (f" --tracking-uri {a.tracking_uri}" if a.tracking_uri else ""),
            highlight=False,
        )
        return 130
    if r.evaluation is not None and int(os.environ.get("RANK", "0")) == 0:
        out.print(ap_table(r.evaluation))
    out.print(f"[green]run {r.run_id} finished[/]; model: runs:/{r.run_id}/model")
    return 0


def ap_table(ev: Any) -> Table:
    """Per-class AP of a run's selected checkpoint on val (and the final split)."""
    table = Table(title="Average precision (VOC07 11-point, IoU > 0.5) of the selected checkpoint")
    table.add_column("class")
    table.add_column("val AP", justify="right")
    splits = [ev.val] + ([ev.final] if ev.final is not None else [])
    if ev.final is not None:
        table.add_column(f"{ev.final_split} AP", justify="right")
    for c in ev.class_names:
        table.add_row(c, *[f"{100 * r.ap[c]:.1f}" for r in splits])
    table.add_row("[bold]mAP", *[f"[bold]{100 * r.map:.1f}" for r in splits])
    if not math.isnan(ev.val.map_coco):
        table.add_row("mAP COCO", *[f"{100 * r.map_coco:.1f}" for r in splits])
    return table


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from maskssd.data import DataReport, FaceMaskDataset, load_split
    from maskssd.data.transforms import eval_transform
    from maskssd.deploy.predictor import load_predictor
    from maskssd.evaluation.detections_file import write_detections
    from maskssd.training.engine import evaluate
    from maskssd.training.runner import build_loader

    pred = load_predictor(a.model, a.tracking_uri, a.device)
    decode = DecodeSpec(
        min_score=a.min_score, max_overlap=a.max_overlap, top_k=a.top_k, class_agnostic=a.class_agnostic
    )
    anns = load_split(a.data, a.split, a.split_name, pred.class_names, a.on_error, DataReport())
    ds = FaceMaskDataset(anns, eval_transform(pred.input_size), pred.class_names)
    collected: list[tuple[str, Any]] = []
    _, result = evaluate(
        pred.model,
        build_loader(ds, a.batch_size, a.workers),
        class_names=pred.class_names,
        device=torch.device(a.device),
        decode=decode,
        prefix=a.split,
        collect=collected,
    )
    assert result is not None
    t = Table(title=f"{a.model} on {a.data} {a.split_name}/{a.split} ({len(ds)} images)")
    for col in ("class", "AP (VOC07)", "AP (all-point)", "AP (COCO .5:.95)", "objects"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for c in pred.class_names:
        t.add_row(
            c,
            f"{100 * result.ap[c]:.1f}",
            f"{100 * result.ap_voc12[c]:.1f}",
            f"{100 * result.ap_coco.get(c, float('nan')):.1f}",
            str(result.n_gt[c]),
        )
    t.add_row(
        "[bold]mean",
        f"[bold]{100 * result.map:.1f}",
        f"{100 * result.map_voc12:.1f}",
        f"{100 * result.map_coco:.1f}",
        "",
    )
    out.print(t)
    out.print(f"COCO AP50: {100 * result.ap50_coco:.1f}")
    if a.save_detections:
        settings = {
            "min_score": decode.min_score,
            "max_overlap": decode.max_overlap,
            "top_k": decode.top_k,
            "class_agnostic": decode.class_agnostic,
            "model": str(a.model),
            "split": a.split,
        }
        path = write_detections(
            a.save_detections,
            pred.class_names,
            collected,
            {x.image_id: (x.width, x.height) for x in anns},
            result,
            settings,
        )
        out.print(f"detections written to {path}")
    return 0


def cmd_detect(a: argparse.Namespace) -> int:
    from maskssd.deploy.detect import detect_source
    from maskssd.deploy.predictor import load_predictor

    pred = load_predictor(
        a.model,
        a.tracking_uri,
        a.device,
        a.backend,
        class_agnostic=a.class_agnostic or None,
        max_overlap=a.max_overlap,
    )
    r = detect_source(
        pred,
        a.source,
        a.out,
        score_threshold=a.score_threshold,
        smooth=a.smooth,
        max_frames=a.max_frames,
        show=a.show,
    )
    if r.kind == "images":
        t = Table(title=f"{r.images} images -> {r.out}")
        for c in r.counts:
            t.add_column(c, justify="right")
        t.add_row(*[str(v) for v in r.counts.values()])
        out.print(t)
        return 0 if r.images else 2
    t = Table(title=f"{a.source}: {r.frames} frames -> {r.video_path}")
    for col in ("frames", "end-to-end FPS", "model-only FPS", "backend"):
        t.add_column(col, justify="right")
    t.add_row(str(r.frames), f"{r.fps:.1f}", f"{r.model_fps:.1f}", r.backend)
    out.print(t)
    err.print(f"per-frame detections: {r.jsonl_path}", highlight=False)
    return 0


def cmd_runs(a: argparse.Namespace) -> int:
    from maskssd.tracking import runs as tracking

    c = tracking.client(a.tracking_uri)
    runs = tracking.runs_table(c, a.experiment, max_results=a.limit)
    if not runs:
        out.print("no runs")
        return 0
    classes = sorted(
        {k.removeprefix("best_val_ap_") for r in runs for k in r.data.metrics if k.startswith("best_val_ap_")}
    )
    rows = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        rows.append(
            {
                "run": r.info.run_id[:8],
                "name": r.info.run_name or "",
                "status": r.info.status,
                "model": p.get("model.name", ""),
                "lr": p.get("optim.lr", ""),
                "alpha": p.get("loss.alpha", ""),
                "neg/pos": p.get("loss.neg_pos_ratio", ""),
                "epochs": p.get("train.epochs", ""),
                "val_map": m.get("best_val_map", m.get("val_map")),
                "test_map": m.get("test_map"),
                **{f"AP {c}": m.get(f"best_val_ap_{c}") for c in classes},
            }
        )
    key = a.sort
    if key:
        if key not in rows[0]:
            raise MaskSSDError(f"cannot sort by {key!r}; columns: {', '.join(rows[0])}")
        rows.sort(
            key=lambda r: (r[key] is None, -(r[key] or 0) if isinstance(r[key], float) else str(r[key]))
        )
    t = Table(title=f"runs ({a.experiment or 'all experiments'})")
    for col in rows[0]:
        t.add_column(
            col,
            justify="right" if col not in ("run", "name", "status", "model") else "left",
            no_wrap=col == "run",
            min_width=8 if col == "run" else None,
        )
    for r in rows:
        t.add_row(
            *[("" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)) for v in r.values()]
        )
    out.print(t)
    return 0


# --------------------------------------------------------------------------------------- studies etc.
def cmd_study(a: argparse.Namespace) -> int:
    from maskssd.tracking.studies import run_study

    o = run_study(
        a.config,
        n_trials=a.n_trials,
        storage=a.storage,
        study_name=a.study_name,
        tracking_uri=a.tracking_uri,
        timeout=a.timeout,
        report=not a.no_report,
    )
    out.print("trials: " + ", ".join(f"{k.lower()} {v}" for k, v in o.states.items()))
    if o.report is not None:
        _print_study_report(o.report)
    return 0


def cmd_study_report(a: argparse.Namespace) -> int:
    from maskssd.tracking.studies import report_study

    _print_study_report(report_study(a.name, storage=a.storage, tracking_uri=a.tracking_uri))
    return 0


def _print_study_report(rep: Any) -> None:
    t = Table(title=f"study {rep.name}: best trials ({rep.direction})")
    for col in ("trial", "value", "test_map", "epoch", "params", "MLflow run"):
        t.add_column(col)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    for number, value, test_map, epoch, params, run_id in rep.best:
        t.add_row(
            str(number),
            f"{value:.4f}",
            "" if test_map is None else f"{test_map:.4f}",
            str(epoch or ""),
            ", ".join(f"{k}={fmt(v)}" for k, v in params.items()),
            run_id[:8],
        )
    out.print(t)
    if rep.importances:
        ti = Table(title="parameter importances (fANOVA)")
        ti.add_column("parameter")
        ti.add_column("importance", justify="right")
        for k, v in rep.importances.items():
            ti.add_row(k, f"{v:.3f}")
        out.print(ti)


def cmd_promote(a: argparse.Namespace) -> int:
    from maskssd.tracking import registry
    from maskssd.tracking import runs as tracking

    if a.study:
        from maskssd.tracking.studies import best_trial_run

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
    out.print(
        f"registered {p.name} version {p.version} from run {p.run_id} ({p.metric} = {p.value:.4f}); "
        f"{verdict}: {p.reason}"
    )
    out.print(
        f"use it: --model models:/{p.name}@{registry.CHAMPION}"
        if p.moved_alias
        else f"use it: --model models:/{p.name}/{p.version}"
    )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from maskssd.deploy.predictor import load_predictor
    from maskssd.deploy.serving import create_app, run_server

    pred = load_predictor(
        a.model, a.tracking_uri, a.device, a.backend, class_agnostic=a.class_agnostic or None
    )
    app = create_app(
        pred,
        max_batch=a.max_batch,
        max_wait_ms=a.max_wait_ms,
        batching=not a.no_batching,
        montage_path=a.montage,
        score_threshold=a.score_threshold,
    )
    d = pred.describe()
    batching = "off" if a.no_batching else f"max {a.max_batch} images / {a.max_wait_ms:g} ms"
    err.print(
        f"serving {a.model} ({d['backend']}, input {d['input_size']}, classes {', '.join(d['classes'])}) on "
        f"http://{a.host}:{a.port}  batching: {batching}" + (f"; montage: {a.montage}" if a.montage else ""),
        highlight=False,
    )
    run_server(app, a.host, a.port)
    return 0


def cmd_stream(a: argparse.Namespace) -> int:
    from maskssd.deploy.video import stream

    r = stream(
        a.server, a.source, camera=a.name, max_frames=a.max_frames, fps=a.fps, jpeg_quality=a.jpeg_quality
    )
    out.print(f"{r.camera}: sent {r.sent} frames ({r.failed} refused), {r.fps:.1f} FPS end to end")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from maskssd.deploy.export import export_model

    r = export_model(a.model, a.format, a.out, tracking_uri=a.tracking_uri)
    out.print(
        f"wrote {r.path} ({r.fmt}, {r.megabytes:.2f} MB) from {r.source} in {r.seconds:.1f} s",
        highlight=False,
    )
    for kind, name, typ, shape in r.io:
        out.print(f"  {kind:6s} {name:7s} {typ:14s} {shape}", highlight=False)
    out.print(
        "  images: RGB float in [0, 1], resized to the input size (the model normalises itself); "
        "scores are logits (softmax over the last axis, class 0 = background)",
        highlight=False,
    )
    colour = "green" if r.ok else "red"
    out.print(
        f"[{colour}]verification against PyTorch on a random batch of 2: max abs diff locs "
        f"{r.max_diff_locs:.2e}, scores {r.max_diff_scores:.2e} (tolerance {r.tolerance:.0e})[/]",
        highlight=False,
    )
    return 0 if r.ok else 1


def cmd_models(a: argparse.Namespace) -> int:
    from maskssd.ssd.models import list_models

    for m in list_models():
        out.print(m)
    return 0
