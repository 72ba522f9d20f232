"""The subcommands: each turns parsed arguments into library calls and prints the results (rich tables).

Errors caused by input (a bad config key, a malformed annotation, a missing model) are MaskSSDErrors: the
entry point prints one clear message naming the file and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskssd.cli.console import Column, TrainBar, err, fit_table, fmt_interval, out
from maskssd.errors import MaskSSDError
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD as DISPLAY_THRESHOLD  # the parser's defaults
from maskssd.ssd.decode_spec import DecodeSpec


# --------------------------------------------------------------------------------------------- train
def cmd_train(a: argparse.Namespace) -> int:
    from maskssd.ssd.warmup import compile_in_background

    # first of all: a fresh install compiles its CPU kernels in a child process while this one imports torch and
    # MLflow, opens the run and prepares the data, instead of at the first training step
    compile_in_background()
    started = time.time()
    from maskssd.errors import RunStopped, TrainingInterrupted
    from maskssd.tracking.experiment import run_experiment
    from maskssd.training.config import load_config

    overrides = [*(a.set or []), *(["train.system_metrics=true"] if a.system_metrics else [])]
    from maskssd.cli.seeds import check_fold

    check_fold(a)
    if a.final_split and not a.folds:
        overrides.append(f'data.final_split="{a.final_split}"')
    cfg = load_config(a.config, overrides)
    if a.nproc and a.nproc > 1:
        from maskssd.training.distributed import launch

        return launch(a.nproc, list(a.argv))
    if a.seeds or a.folds or (a.resume and _is_seeds_parent(a.resume, a.tracking_uri)):
        from maskssd.cli.seeds import train_seeds

        return train_seeds(a, cfg)
    try:
        r = run_experiment(
            cfg,
            tracking_uri=a.tracking_uri,
            run_name=a.run_name,
            resume_run_id=a.resume,
            progress=None if a.no_progress else TrainBar(),
        )
    except (TrainingInterrupted, RunStopped) as e:
        stopped = isinstance(e, RunStopped)
        err.print(
            ("[bold red]error:[/] " if stopped else "[yellow]")
            + f"{escape(str(e))}{'' if stopped else '; checkpoint saved.[/]'} Resume with:\n  maskssd train "
            f"{a.config} --resume {e.run_id}"
            + (f" --tracking-uri {a.tracking_uri}" if a.tracking_uri else ""),
            highlight=False,
        )
        return 2 if stopped else 130
    if r.evaluation is not None and int(os.environ.get("RANK", "0")) == 0:
        out.print(ap_table(r.evaluation))
        if a.record:
            from maskssd.cli.seeds import write_run_record

            write_run_record(a, r.run_id, started)
    if a.save_detections and int(os.environ.get("RANK", "0")) == 0:
        from maskssd.cli.seeds import save_run_detections

        err.print(f"detections written to {save_run_detections(a, r.run_id)}", highlight=False)
    model = f"model: {r.model_uri} (also runs:/{r.run_id}/model)" if r.model_uri else "no model logged"
    out.print(f"[green]run {r.run_id} finished[/]; {model}", highlight=False)
    if int(os.environ.get("RANK", "0")) == 0:
        from maskssd.tracking.runs import ui_link

        out.print(f"see it: {ui_link(r.run_id, a.tracking_uri)}", highlight=False, soft_wrap=True)
    return 0


def _is_seeds_parent(run_id: str, tracking_uri: str | None) -> bool:
    from maskssd.tracking.seeds import is_seeds_parent

    return is_seeds_parent(run_id, tracking_uri=tracking_uri)


def ap_table(ev: Any) -> Table:
    """Per-class AP of a run's selected checkpoint on val (and the final split), with bootstrap intervals."""
    table = Table(title="Average precision (VOC07 11-point, IoU > 0.5) of the selected checkpoint")
    table.add_column("class")
    splits = [("val", ev.val)] + ([(ev.final_split, ev.final)] if ev.final is not None else [])
    boots = [getattr(ev.reports.get(s), "bootstrap", None) for s, _ in splits]
    ci = next((f" [{100 * b.ci:g}% CI]" for b in boots if b is not None), "")
    for split, _ in splits:
        table.add_column(f"{split} AP{ci}", justify="right")

    def cell(value: float, boot: Any, key: str) -> str:
        iv = None if boot is None else boot.map if key == "map" else boot.ap[key]
        return fmt_interval(value, iv.low, iv.high) if iv is not None else f"{100 * value:.1f}"

    for c in ev.class_names:
        table.add_row(c, *[cell(r.ap[c], b, c) for (_, r), b in zip(splits, boots)])
    table.add_row("[bold]mAP", *[f"[bold]{cell(r.map, b, 'map')}" for (_, r), b in zip(splits, boots)])
    if not math.isnan(ev.val.map_coco):
        table.add_row("mAP COCO", *[f"{100 * r.map_coco:.1f}" for _, r in splits])
    return table


def cmd_evaluate(a: argparse.Namespace) -> int:
    from maskssd.cli import evaluate_more
    from maskssd.cli.research import analysis_tables, metrics_table
    from maskssd.data import DataReport, load_split
    from maskssd.deploy.model_ref import resolve_checkpoint
    from maskssd.deploy.predictor import load_predictor
    from maskssd.evaluation.report import ReportSpec, report_split

    evaluate_more.check_args(a)
    started = time.time()
    decode = DecodeSpec(
        min_score=a.min_score, max_overlap=a.max_overlap, top_k=a.top_k, class_agnostic=a.class_agnostic
    )
    if a.split == "oof":  # a cross-validation parent: each fold's model on its own fold
        from maskssd.cli.evaluate_oof import score_oof

        pred, evalset, title, data = score_oof(a, decode, _predictor_options)
    else:
        ckpt_path = resolve_checkpoint(a.model, a.tracking_uri)
        evaluate_more.data_of_model(a, ckpt_path)
        options = _predictor_options(a, a.split_name)
        pred = load_predictor(ckpt_path, device=a.device, backend=a.backend, auto_int8=False, **options)
        anns = load_split(a.data, a.split, a.split_name, pred.class_names, a.on_error, DataReport())
        evalset = evaluate_more.score(a, pred, anns, decode)
        title = f"{a.model} on {a.data} {a.split_name}/{a.split} ({len(anns)} images)"
        data = {"root": str(Path(a.data).resolve()), "split_name": a.split_name, "split": a.split}
    spec = ReportSpec(a.bootstrap, a.seed, a.ci, a.operating_threshold)
    report = report_split(evalset, spec, split=a.split, fit_thresholds=a.fit_thresholds)
    result, boot, analysis = report.result, report.bootstrap, report.analysis
    extra = evaluate_more.fit_thresholds(a, ckpt_path, pred, report.thresholds) if a.fit_thresholds else {}
    saved = _save_detections(a, decode, pred, report, data) if a.save_detections else None
    if a.json or a.record:
        more = {"thresholds": extra, "detections_file": saved, "intervals": boot.to_dict() if boot else None}
        doc = evaluate_more.evaluation_doc(a, pred, report, more)
        if a.record:
            evaluate_more.write_record(a, doc, started)
        if a.json:
            evaluate_more.print_json(doc)
            return 0
    if boot is not None:
        title += f"; {100 * boot.ci:g}% intervals from {boot.n} image resamples (seed {boot.seed})"
    out.print(metrics_table(title, result, pred.class_names, boot))
    out.print(f"COCO AP50: {100 * result.ap50_coco:.1f}")
    for table in analysis_tables(analysis):
        out.print(table)
    if saved:
        out.print(f"detections written to {saved}")
    return 0


def _save_detections(a: argparse.Namespace, decode: DecodeSpec, pred: Any, report: Any, data: Any) -> str:
    from maskssd.evaluation.detections_file import write_detections

    settings = {
        "min_score": decode.min_score,
        "max_overlap": decode.max_overlap,
        "top_k": decode.top_k,
        "class_agnostic": decode.class_agnostic,
        "tta_hflip": a.tta_hflip,
        "backend": pred.backend,
        "model": str(a.model),
        "split": a.split,
    }
    path = write_detections(
        a.save_detections,
        report.evalset,
        report.result,
        settings,
        bootstrap=report.bootstrap,
        data=data,
    )
    return str(path)


def cmd_detect(a: argparse.Namespace) -> int:
    from maskssd.deploy.detect import detect_source
    from maskssd.deploy.predictor import load_predictor

    pred = load_predictor(
        a.model,
        a.tracking_uri,
        a.device,
        a.backend,
        **_predictor_options(a),
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
        in_flight=a.in_flight,
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
    t.add_row(str(r.frames), f"{r.fps:.1f}", f"{r.model_fps:.1f}", f"{r.backend}, {r.in_flight} in flight")
    out.print(t)
    err.print(f"per-frame detections: {r.jsonl_path}", highlight=False)
    return 0


def cmd_runs(a: argparse.Namespace) -> int:
    from maskssd.cli.seeds import cell_text, metric_cell, run_order, sort_grouped
    from maskssd.tracking import runs as tracking

    c = tracking.client(a.tracking_uri, create=False)
    runs = tracking.runs_table(c, a.experiment, max_results=a.limit)
    if not runs:
        out.print("no runs")
        return 0
    classes = (
        sorted(  # final per-class AP: val_ap_* (a seeds parent: val_ap_*_mean; older runs: best_val_ap_*)
            {
                k.removeprefix("best_").removeprefix("val_ap_").removesuffix("_mean")
                for r in runs
                for k in r.data.metrics
                if k.startswith(("val_ap_", "best_val_ap_"))
                and not k.removesuffix("_mean").endswith(("_std", "_ci_low", "_ci_high"))
            }
        )
    )
    order = run_order(runs, a.children)  # a seeds parent's children: hidden, or listed under it
    rows, intervals = [], {}
    parent_name = ""
    for r, child in order:
        m, p = r.data.metrics, r.data.params
        name = r.info.run_name or ""
        if not child:
            parent_name = name
        elif parent_name and name.startswith(parent_name):  # "└ -seed1" under "exp-seeds", not the name again
            name = "…" + name[len(parent_name) :]
        rows.append(
            {
                "run": r.info.run_id[:8],
                "name": ("└ " if child else "") + name,
                "status": r.info.status,
                "model": p.get("model.name", ""),
                "lr": p.get("optim.lr", ""),
                "alpha": p.get("loss.alpha", ""),
                "neg/pos": p.get("loss.neg_pos_ratio", ""),
                "epochs": p.get("train.epochs", ""),
                "val_map": metric_cell(m, "val_map", "best_val_map", "val/map"),  # final, else the latest
                "test_map": metric_cell(m, "test_map"),
                **{f"AP {c}": metric_cell(m, f"val_ap_{c}", f"best_val_ap_{c}") for c in classes},
            }
        )
        intervals[id(rows[-1])] = _run_intervals(m)
    key = a.sort
    if key:
        if key not in rows[0]:
            raise MaskSSDError(f"cannot sort by {key!r}; columns: {', '.join(rows[0])}")
        rows = sort_grouped(
            rows,
            [child for _, child in order],
            lambda r: (r[key] is None, -(r[key] or 0) if isinstance(r[key], float) else str(r[key])),
        )
    columns = [
        Column("run", "run", 0, "left"),
        Column("name", "name", 2, "left", shrink=True, min_width=12),
        Column("status", "status", 3, "left"),
        Column("val_map", "val mAP %", 1),
        Column("test_map", "test mAP %", 4),
        *[Column(f"AP {c}", f"val AP % {c.replace('_', ' ')}", 5 + i) for i, c in enumerate(classes)],
        Column("model", "model", 20, "left"),
        *[Column(k, k, 21 + i) for i, k in enumerate(("epochs", "lr", "alpha", "neg/pos"))],
    ]
    cells = [
        {k: intervals[id(r)].get(k) or (v.lower() if k == "status" else cell_text(v)) for k, v in r.items()}
        for r in rows
    ]
    title = f"runs ({a.experiment or 'all experiments'}; metrics in %)"
    t, left_out = fit_table(title, columns, cells, None if a.wide else out.width, a.wide)
    (Console(file=out.file, width=max(out.width, 400)) if a.wide else out).print(t)
    if left_out:
        err.print(f"[dim]not shown to fit {out.width} columns: {', '.join(left_out)}; --wide shows all[/]")
    return 0


def _run_intervals(m: dict[str, float]) -> dict[str, str]:
    """``66.5 [61.0, 71.9]`` cells for val_map and test_map where the run logged bootstrap intervals."""
    cells = {}
    for col, base in (("val_map", "val_map"), ("test_map", "test_map")):
        low, high = m.get(f"{base}_ci_low"), m.get(f"{base}_ci_high")
        if base in m and low is not None and high is not None:
            cells[col] = fmt_interval(m[base], low, high)
    return cells


# --------------------------------------------------------------------------------------- studies etc.
def cmd_study(a: argparse.Namespace) -> int:
    from maskssd.tracking.studies import run_study

    kw = {"n_trials": a.n_trials, "storage": a.storage, "study_name": a.study_name}
    kw.update(tracking_uri=a.tracking_uri, timeout=a.timeout, report=not a.no_report)
    if a.workers > 1:
        from maskssd.tracking.study_workers import run_study_workers

        o = run_study_workers(a.config, workers=a.workers, threads=a.threads, **kw)
    else:
        o = run_study(a.config, **kw)
    out.print("trials: " + ", ".join(f"{k.lower()} {v}" for k, v in o.states.items()))
    if o.report is not None:
        _print_study_report(o.report)
    return 0


def cmd_study_report(a: argparse.Namespace) -> int:
    from maskssd.tracking.studies import report_study

    rep = report_study(a.name, storage=a.storage, tracking_uri=a.tracking_uri)
    _print_study_report(rep)
    if a.record:
        from maskssd.provenance import make_record, write_record

        title = f"study {rep.name}"
        out.print(
            f"record written to {write_record(a.record, make_record('study', rep.summary, title=title))}"
        )
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
    if rep.fidelity is not None:
        out.print(_fidelity_table(rep.fidelity))


def _fidelity_table(f: Any) -> Table:
    """Spearman ρ between trials' early and final values, over the trials that ran the full budget (a fold
    study: fold 1's epochs, then each fold's running mean; its final value is out of fold)."""
    budget = f"all {f.folds} folds" if f.folds else f"all {f.full_epochs} epochs"
    rung = f.step_name(f.rung_epoch) + (" (the fold rung)" if f.folds else " (the lowest rung)")
    out.print(
        f"cheap fidelity: Spearman ρ = {_rho(f.spearman)} between the value at {rung} and the final value, over "
        f"{f.n} trials that ran {budget}",
        highlight=False,
    )
    t = Table(title="cheap-fidelity check, by " + ("step" if f.folds else "epoch"))
    for col in ("step" if f.folds else "epoch", "Spearman ρ", "trials"):
        t.add_column(col, justify="right")
    for step, (rho, n) in f.by_epoch.items():
        t.add_row(f.step_name(step) if f.folds else str(step), _rho(rho), str(n))
    return t


def _rho(v: float) -> str:
    return "n/a (needs 3+ trials, not all tied)" if math.isnan(v) else f"{v:+.2f}"


def cmd_promote(a: argparse.Namespace) -> int:
    from maskssd.tracking import registry
    from maskssd.tracking import runs as tracking

    if a.study:
        from maskssd.tracking.studies import best_trial_run

        run_id, extra = best_trial_run(a.study, a.storage, a.tracking_uri)
        metric = a.metric or "val_map"
    elif a.run:
        run_id, extra, metric = a.run, {}, a.metric or "val_map"
    else:
        if not (a.experiment and a.metric):
            raise MaskSSDError("say which run: --study NAME, --run RUN_ID, or --experiment NAME --metric M")
        c = tracking.client(a.tracking_uri, create=False)
        chosen = registry.select_best(c, a.experiment, a.metric, not a.minimize)
        out.print(f"run {chosen.run_id}: {chosen.describe()}")
        if len(chosen.configs) > 1:
            err.print(
                "[yellow]these runs come from different configs: the best of them on validation is a choice "
                "across recipes and seeds; compare the configs first (maskssd compare PARENT_A PARENT_B)[/]"
            )
        run_id, extra, metric = chosen.run_id, {}, a.metric
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
    from maskssd.deploy.auth import is_loopback, load_tokens

    tokens = load_tokens(a.token_file) or None  # the file, else $MASKSSD_SERVE_TOKENS
    if tokens is None and not is_loopback(a.host) and not a.insecure_no_auth:
        raise MaskSSDError(
            f"refusing to serve {a.host} without authentication: anyone who reaches this machine could use the "
            "model. Give the clients' tokens (--token-file FILE or $MASKSSD_SERVE_TOKENS), or say "
            "--insecure-no-auth if that is what you want"
        )
    if bool(a.ssl_certfile) != bool(a.ssl_keyfile):
        raise MaskSSDError("TLS needs both --ssl-certfile and --ssl-keyfile")
    from maskssd.deploy.predictor import load_predictor
    from maskssd.deploy.serving import create_app, run_server

    pred = load_predictor(
        a.model,
        a.tracking_uri,
        a.device,
        a.backend,
        **_predictor_options(a),
        class_agnostic=a.class_agnostic or None,
    )
    app = create_app(
        pred,
        max_batch=a.max_batch,
        max_wait_ms=a.max_wait_ms,
        batching=not a.no_batching,
        montage_path=a.montage,
        score_threshold=a.score_threshold,
        max_queue=a.max_queue,
        tokens=tokens,
        rate_limit=a.rate_limit,
        burst=a.burst,
        model_workers=a.model_workers,
    )
    d = pred.describe()
    batching = "off" if a.no_batching else f"max {a.max_batch} images / {a.max_wait_ms:g} ms"
    batching += f", {a.model_workers} model worker(s)"
    scheme = "https" if a.ssl_certfile else "http"
    err.print(
        f"serving {a.model} ({d['backend']}, input {d['input_size']}, classes {', '.join(d['classes'])}) on "
        f"{scheme}://{a.host}:{a.port}  batching: {batching}"
        + (f"; montage: {a.montage}" if a.montage else ""),
        highlight=False,
    )
    if tokens is None:
        warn = "[bold yellow]warning:[/] no authentication"
        err.print(
            f"{warn} (--insecure-no-auth)" if a.insecure_no_auth else f"{warn}: loopback only",
            highlight=False,
        )
    else:
        err.print(f"authentication: {len(tokens)} bearer token(s); GET /livez open", highlight=False)
    run_server(app, a.host, a.port, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile)
    return 0


def cmd_stream(a: argparse.Namespace) -> int:
    from maskssd.deploy.video import stream

    token = None
    if a.token_file or os.environ.get("MASKSSD_TOKEN"):
        from maskssd.deploy.auth import load_tokens

        token = load_tokens(a.token_file, env="MASKSSD_TOKEN")[0]
    r = stream(
        a.server,
        a.source,
        camera=a.name,
        max_frames=a.max_frames,
        fps=a.fps,
        jpeg_quality=a.jpeg_quality,
        token=token,
        ca_file=a.ca_file,
    )
    out.print(f"{r.camera}: sent {r.sent} frames ({r.failed} refused), {r.fps:.1f} FPS end to end")
    return 0


def _predictor_options(a: argparse.Namespace, split_name: str = "paper") -> dict[str, Any]:
    """``load_predictor`` keywords of the inference options (``--tta-hflip``, ``--no-fold-bn``, calibration)."""
    calibration = None
    if a.calibration:  # else int8 calibrates on the images the model carries
        from maskssd.deploy.quantize import Calibration

        calibration = Calibration(
            Path(a.calibration), a.calibration_split_name or split_name, a.calibration_images
        )
    return {"tta_hflip": a.tta_hflip, "fold_bn": not a.no_fold_bn, "calibration": calibration}


def cmd_export(a: argparse.Namespace) -> int:
    from maskssd.deploy.export import export_model

    if a.int8:
        return _export_int8(a)
    if a.format == "checkpoint":
        return _export_checkpoint(a)
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


def _export_checkpoint(a: argparse.Namespace) -> int:
    from maskssd.deploy.quantize import Calibration, carry_calibration

    if not a.calibration:
        raise MaskSSDError("--format checkpoint writes the model carrying --calibration DATA_ROOT's images")
    cal = Calibration(Path(a.calibration), a.split_name, a.calibration_images)
    path, n = carry_calibration(a.model, a.out, cal, tracking_uri=a.tracking_uri)
    out.print(f"wrote {path}: the model, carrying {n} calibration images for int8", highlight=False)
    return 0


def _export_int8(a: argparse.Namespace) -> int:
    from maskssd.deploy.quantize import Calibration, export_int8

    if a.format != "onnx":
        raise MaskSSDError("--int8 needs --format onnx")
    cal = Calibration(Path(a.calibration), a.split_name, a.calibration_images) if a.calibration else None
    r = export_int8(a.model, a.out, cal, tracking_uri=a.tracking_uri)
    out.print(
        f"wrote {r.path} (ONNX int8, {r.megabytes:.2f} MB) from {r.source} in {r.seconds:.1f} s, calibrated on "
        f"{r.calibration_images} images ({r.calibrated_on}); "
        + (
            "7-bit weights (this CPU has no VNNI: its int8 kernels would saturate)"
            if r.reduce_range
            else "8-bit weights"
        ),
        highlight=False,
    )
    colour = "green" if r.ok else "red"
    out.print(
        f"[{colour}]against the float model on {min(4, r.calibration_images)} calibration images: correlation "
        f"locs {r.corr_locs:.4f}, scores {r.corr_scores:.4f} (minimum {r.min_corr}); max abs diff locs "
        f"{r.max_diff_locs:.3f}, scores {r.max_diff_scores:.3f}[/]",
        highlight=False,
    )
    return 0 if r.ok else 1


def cmd_models(a: argparse.Namespace) -> int:
    from maskssd.ssd.models import list_models

    for m in list_models():
        out.print(m)
    return 0
