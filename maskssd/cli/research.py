"""Research commands and tables: ``maskssd compare`` (the paired bootstrap of two runs' saved detections),
``maskssd study-config`` (a study trial as a full-budget experiment), and the uncertainty and error-analysis tables ``maskssd evaluate`` prints."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from maskssd.cli.console import err, fmt_interval, out
from maskssd.errors import MaskSSDError

__all__ = ["analysis_tables", "cmd_compare", "cmd_study_config", "metrics_table"]


def metrics_table(title: str, result: Any, class_names: Sequence[str], boot: Any = None) -> Table:
    """Per-class AP (VOC07 with its bootstrap interval when given, all-point, COCO) and objects."""
    t = Table(title=title)
    ci = f" [{100 * boot.ci:g}% CI]" if boot is not None else ""
    for col in ("class", f"AP (VOC07){ci}", "AP (all-point)", "AP (COCO .5:.95)", "objects"):
        t.add_column(col, justify="right" if col != "class" else "left")

    def cell(value: float, iv: Any) -> str:
        return fmt_interval(value, iv.low, iv.high) if iv is not None else fmt_interval(value)

    for c in class_names:
        t.add_row(
            c,
            cell(result.ap[c], boot.ap[c] if boot is not None else None),
            fmt_interval(result.ap_voc12[c]),
            fmt_interval(result.ap_coco.get(c, float("nan"))),
            str(result.n_gt[c]),
        )
    t.add_row(
        "[bold]mean",
        "[bold]" + cell(result.map, boot.map if boot is not None else None),
        fmt_interval(result.map_voc12),
        fmt_interval(result.map_coco),
        "",
    )
    return t


def analysis_tables(analysis: Any) -> list[Table]:
    """AP and recall by face size, false boxes at the operating threshold, and the confusion matrix there."""
    from maskssd.evaluation.analysis import SIZE_BUCKETS

    thr = f"score >= {analysis.threshold:g}"
    size = Table(title=f"by face size ({analysis.size_measure}): VOC07 AP / recall at {thr} / objects")
    size.add_column("class")
    for _, label in SIZE_BUCKETS:
        size.add_column(label, justify="right")
    size.add_column("all sizes", justify="right")
    for c in [*analysis.class_names, "all"]:
        cells = []
        for key, _ in SIZE_BUCKETS:
            ap = analysis.map_by_size[key] if c == "all" else analysis.ap[c][key]
            cells.append(
                f"{fmt_interval(ap)} / {fmt_interval(analysis.recall[c][key])} / {analysis.n_gt[c][key]}"
            )
        cells.append(f"- / {fmt_interval(analysis.recall[c]['all'])} / {analysis.n_gt[c]['all']}")
        size.add_row("[bold]all (mAP)" if c == "all" else c, *cells)
    ops = Table(title=f"detections at the operating threshold ({thr})")
    for col in ("class", "shown", "true", "false", "precision", "recall"):
        ops.add_column(col, justify="right" if col != "class" else "left")
    for c in analysis.class_names:
        d = analysis.detections[c]
        prec = d["tp"] / d["above"] if d["above"] else float("nan")
        ops.add_row(
            c,
            str(d["above"]),
            str(d["tp"]),
            str(d["false"]),
            fmt_interval(prec),
            fmt_interval(analysis.recall[c]["all"]),
        )
    names = ["background", *analysis.class_names]
    conf = Table(title=f"confusion matrix at {thr} (rows: true class, columns: predicted)")
    conf.add_column("true \\ predicted")
    for n in names:
        conf.add_column(n, justify="right")
    for n, row in zip(names, analysis.confusion.tolist()):
        conf.add_row(n, *[str(v) for v in row])
    return [size, ops, conf]


# ------------------------------------------------------------------------------------------- compare
def _load_side(refs: str, split: str, tracking_uri: str | None, tmp: Path) -> list[dict[str, Any]]:
    """A side's detection files: each file, each run's ``detections/<split>.json``, a seeds parent's finished
    children's, a cross-validation parent's out-of-fold files (every seed's); one fold's files (a fold run's,
    or what ``evaluate --split oof`` wrote of it) joined per seed into the out-of-fold set of the folds given.
    ``folds_hash``: the folds' digest of out-of-fold detections (a parent's tag, or what its file says), else
    None."""
    from maskssd.evaluation.detections_file import load_detections, merge_folds
    from maskssd.tracking.folds import download_oof, is_cv_parent
    from maskssd.tracking.runs import client, download_detections

    docs = []
    c = (
        client(tracking_uri, create=False)
        if any(not Path(r).is_file() for r in refs.split(",") if r)
        else None
    )
    for ref in [r for r in refs.split(",") if r]:
        if c is not None and split in ("val", "oof") and is_cv_parent(c, ref):
            paths, digest = download_oof(c, ref, tmp)
            err.print(f"parent {ref[:12]}: out-of-fold detections of {len(paths)} seed(s)", highlight=False)
            for path in paths:
                docs.append({**load_detections(path), "ref": ref, "folds_hash": digest})
            continue
        for run in _expand_parents([ref], tracking_uri):
            doc = load_detections(download_detections(run, split, tmp, tracking_uri))
            docs.append({**doc, "ref": run})
    if not docs:
        raise MaskSSDError(f"no run or file in {refs!r}")
    docs = merge_folds(docs)
    for d in docs:
        d.setdefault("folds_hash", (d.get("data") or {}).get("folds_hash"))
        present = (d.get("data") or {}).get("folds_present")
        if present:
            err.print(f"{_short(d['ref'])}: fold(s) {_folds(present)} joined out of fold", highlight=False)
    return docs


def _folds(ks: Sequence[int]) -> str:
    return ", ".join(map(str, ks))


def _common_folds(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Out-of-fold docs restricted to the folds every one holds: a cross-validation trained fold by fold pairs
    with another on the folds both have so far. ``(docs, note)``: the note (empty when nothing was left out)
    says which folds and how many images are compared."""
    from maskssd.evaluation.detections_file import restrict

    if not docs[0]["folds_hash"]:
        return docs, {}
    k = int((docs[0].get("data") or {}).get("folds") or 0)
    full = list(range(1, k + 1))
    held = [(d.get("data") or {}).get("folds_present") or full for d in docs]
    common = sorted(set.intersection(*map(set, held)))
    if all(h == full for h in held):
        return docs, {}
    if not common:
        raise MaskSSDError(
            "the two sides hold no fold in common (" + "; ".join(_folds(h) for h in held) + "): train the "
            "same fold of each"
        )
    ids = set.intersection(
        *({im["id"] for im in d["images"]} for d in docs if d["data"].get("folds_present"))
    )
    note = {"folds_compared": common, "folds": k, "partial": True}
    err.print(
        f"[yellow]fold(s) {_folds(common)} of {k} only ({len(ids)} images): a part of the out-of-fold set, "
        "not a verdict on the whole[/]",
        highlight=False,
    )
    return [restrict(d, ids) for d in docs], note


def _check_folds(docs_a: list[dict[str, Any]], docs_b: list[dict[str, Any]]) -> None:
    """Out-of-fold detections pair only with out-of-fold detections of the same folds."""
    hashes = {(d["ref"][:12], d["folds_hash"]) for d in [*docs_a, *docs_b]}
    kinds = {h is None for _, h in hashes}
    if kinds == {True}:
        return
    if len(kinds) > 1 or len({h for _, h in hashes}) > 1:
        listed = ", ".join(f"{r}: {h or 'no folds'}" for r, h in sorted(hashes))
        raise MaskSSDError(
            f"different folds ({listed}): a paired out-of-fold comparison needs two cross-validations of the "
            "same images with the same data.folds and data.fold_seed"
        )


def _expand_parents(refs: list[str], tracking_uri: str | None) -> list[str]:
    """A seeds parent stands for its finished children (pooled: seeds x images); files and other runs stay."""
    from maskssd.tracking.seeds import finished_children, is_seeds_parent

    expanded: list[str] = []
    for ref in refs:
        if Path(ref).is_file() or not is_seeds_parent(ref, tracking_uri=tracking_uri):
            expanded.append(ref)
            continue
        kids = finished_children(ref, tracking_uri=tracking_uri)
        if not kids:
            raise MaskSSDError(
                f"seeds parent {ref} has no finished child run yet: resume it with --resume {ref}"
            )
        err.print(f"parent {ref[:12]}: {len(kids)} finished seeds pooled", highlight=False)
        expanded.extend(kids)
    return expanded


def _annotations(doc: Mapping[str, Any], a: argparse.Namespace, split: str) -> list[Any]:
    from maskssd.data import DataReport, load_split

    data = doc.get("data") or {}
    root = a.data or data.get("root")
    if not root:
        raise MaskSSDError(f"{doc['ref']}: the file does not say where its data is; pass --data ROOT")
    if not Path(root).is_dir():
        raise MaskSSDError(f"the data of {doc['ref']} is not at {root}; pass --data ROOT")
    split_name = a.split_name or data.get("split_name", "paper")
    report = DataReport()
    splits = data.get("splits") or [split]  # out-of-fold and fold files: the train and val images together
    on_error = a.on_error
    return [x for s in splits for x in load_split(root, s, split_name, doc["classes"], on_error, report)]


def _short(ref: str) -> str:
    """A run id's first 12 characters, a file's name (a path cut at 12 characters says nothing); joined fold
    files or runs: each, with ``+``."""
    if "," in ref:
        return "+".join(_short(r) for r in ref.split(","))
    return Path(ref).name if Path(ref).is_file() else ref[:12]


def cmd_compare(a: argparse.Namespace) -> int:
    from maskssd.evaluation.detections_file import compare_detections

    with tempfile.TemporaryDirectory() as tmp:
        docs_a = _load_side(a.run_a, a.split, a.tracking_uri, Path(tmp))
        docs_b = _load_side(a.run_b, a.split, a.tracking_uri, Path(tmp))
    _check_folds(docs_a, docs_b)
    split = (docs_a[0].get("data") or {}).get("split", a.split)  # a file says which split it holds
    partial: dict[str, Any] = {}
    if docs_a[0]["folds_hash"]:
        split = "oof"
        both, partial = _common_folds([*docs_a, *docs_b])
        docs_a, docs_b = both[: len(docs_a)], both[len(docs_a) :]
    anns = _annotations(docs_a[0], a, split)
    r = compare_detections(docs_a, docs_b, anns, n=a.n, seed=a.seed, ci=a.ci)
    n_images = len(docs_a[0]["images"])
    doc = {
        "a": [d["ref"] for d in docs_a],
        "b": [d["ref"] for d in docs_b],
        "split": split,
        "images": n_images,
        **({"folds_hash": docs_a[0]["folds_hash"]} if docs_a[0]["folds_hash"] else {}),
        **partial,
        **r.to_dict(),
    }
    if a.record:
        from maskssd.provenance import make_record, write_record

        record = make_record("compare", doc, title=f"{a.run_a} vs {a.run_b} ({split})")
        err.print(f"record written to {write_record(a.record, record)}", highlight=False)
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    name = lambda docs: ", ".join(_short(d["ref"]) for d in docs)  # noqa: E731
    t = Table(
        title=f"A = {name(docs_a)}  vs  B = {name(docs_b)}: {split} split"
        + (f" (fold(s) {_folds(partial['folds_compared'])} of {partial['folds']})" if partial else "")
        + f", {n_images} images, paired bootstrap "
        f"({r.n} resamples, seed {r.seed}); AP in %, VOC07"
    )
    for col in ("", "A", "B", f"A - B [{100 * r.ci:g}% CI]", "P(A > B)", "ties"):
        t.add_column(col, justify="right" if col else "left")
    for key, iv in r.diff.items():
        t.add_row(
            "[bold]mAP" if key == "map" else key,
            fmt_interval(r.a[key]),
            fmt_interval(r.b[key]),
            fmt_interval(iv.estimate, iv.low, iv.high, signed=True),
            f"{r.a_wins[key]:.3f}",
            f"{r.ties[key]:.3f}",
        )
    out.print(t)
    out.print(
        "A - B is the difference on the same images; the interval holds the middle "
        f"{100 * r.ci:g}% of {r.n} image resamples; P(A > B) is the share of resamples in which A scores higher.",
        highlight=False,
    )
    return 0


def cmd_study_config(a: argparse.Namespace) -> int:
    """Write a study trial's recipe at full budget as an experiment TOML (stdout without ``-o``)."""
    from maskssd.tracking.studies import trial_recipe
    from maskssd.training.config import dump_toml, rebase_paths

    data, trial = trial_recipe(a.config, trial=a.trial, storage=a.storage, study_name=a.study_name)
    # its paths relative to where it is written (stdout: beside the base experiment), its own experiment
    dest = Path(a.output).parent if a.output else base_experiment_dir(a.config)
    rebase_paths(data, Path.cwd(), dest)
    data.setdefault("experiment", {})["name"] = Path(a.output).stem if a.output else f"{trial_study(a)}-best"
    values = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )
    header = (
        f"# Trial {trial.number} of the study in {a.config} (value {trial.value:.4f} at the study's fidelity),\n"
        f"# at the base experiment's full budget. Written by `maskssd study-config {a.config}`.\n"
        f"# Sampled: {values}\n# Relative paths are relative to {dest}/, where this file belongs.\n\n"
    )
    text = header + dump_toml(data)
    if a.output:
        Path(a.output).write_text(text)
        out.print(f"wrote {a.output} (trial {trial.number}, value {trial.value:.4f})", highlight=False)
    else:
        out.print(text, highlight=False, markup=False, soft_wrap=True)
    return 0


def base_experiment_dir(study_file: str | Path) -> Path:
    """The folder of a study's base experiment (where a recipe printed to stdout belongs)."""
    from maskssd.tracking.study_config import load_study_config

    return load_study_config(study_file)[1].parent


def trial_study(a: argparse.Namespace) -> str:
    from maskssd.tracking.study_config import load_study_config

    return a.study_name or load_study_config(a.config)[0].study.name
