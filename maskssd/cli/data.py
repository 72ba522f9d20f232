"""``maskssd data ...``: synthesise, split, inspect a dataset, and fit default boxes to its boxes."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from maskssd.cli.console import out
from maskssd.errors import MaskSSDError


def cmd_data_synth(a: argparse.Namespace) -> int:
    from maskssd.data.synth import generate

    s = generate(a.out, n_images=a.images, seed=a.seed, split_name=a.split_name)
    out.print(
        f"wrote {s.images} synthetic images to {s.root} (split {s.split_name!r}: {s.split_sizes}); boxes: {s.boxes}"
    )
    return 0


def cmd_data_import(a: argparse.Namespace) -> int:
    from maskssd.data.convert import import_dataset

    s = import_dataset(a.format, a.src, a.dst, seed=a.seed)
    boxes = ", ".join(f"{c} {n}" for c, n in s.boxes.items())
    out.print(
        f"wrote {s.images} images to {s.root} ({len(s.classes)} classes; boxes: {boxes})", highlight=False
    )
    for name, parts in s.splits.items():
        sizes = ", ".join(f"{k} {v}" for k, v in parts.items())
        out.print(f"  split list {name!r}: {sizes}", highlight=False)
    out.print("an experiment on it starts with:\n" + s.config_lines(), highlight=False)
    return 0


def cmd_data_split(a: argparse.Namespace) -> int:
    from maskssd.data import DEFAULT_CLASSES, load_annotations, stratified_split, write_split

    classes = a.classes or list(DEFAULT_CLASSES)
    anns = load_annotations(a.root, None, classes, a.on_error)
    parts = stratified_split(anns, a.ratios, a.seed, len(classes))
    path = write_split(a.root, a.split_name, parts)
    out.print(
        f"wrote {path}: train {len(parts[0])}, val {len(parts[1])}, test {len(parts[2])} images (seed {a.seed})"
    )
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
    split_names = [a.split_name] if a.split_name else layout.split_names()
    for name in split_names:
        for split in [a.split] if a.split else ["train", "val", "test"]:
            ids = (
                layout.read_split(name, split)
                if (a.split_name or layout.split_file(name, split).is_file())
                else []
            )
            missing = [i for i in ids if i not in by_id]
            if missing and a.on_error == "raise":
                raise MaskSSDError(
                    f"{layout.split_file(name, split)}: {len(missing)} ids have no valid annotation "
                    f"(first: {missing[0]})"
                )
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


def _anchor_layout(a: argparse.Namespace):  # noqa: ANN202 - an anchors.ModelLayout
    """The maps to fit: from ``--config`` (and ``--set``), else from ``--input-size/--levels/--min-stride``."""
    from maskssd.ssd.anchors import layout_from_size, layout_of_model

    if a.config:
        if a.input_size is not None or a.levels is not None or a.min_stride is not None:
            raise MaskSSDError(
                "--config gives the input size and the maps; change them with --set model.KEY=VALUE "
                "(e.g. --set model.input_size=320), not --input-size/--levels/--min-stride"
            )
        from maskssd.training.config import load_config

        cfg = load_config(a.config, a.set or [])
        return layout_of_model(cfg.model.name, cfg.model.build_kwargs(), len(cfg.class_names) + 1, a.config)
    else:
        if a.set:
            raise MaskSSDError("--set overrides a --config; there is none")
        return layout_from_size(a.input_size or 384, a.levels or 6, a.min_stride or 8)


def cmd_data_anchors(a: argparse.Namespace) -> int:
    from maskssd.data import DEFAULT_CLASSES, load_split
    from maskssd.ssd.anchors import evaluate_priors, fit_anchors, normalized_boxes

    layout = _anchor_layout(a)
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

    t = Table(
        title=f"default boxes for {layout.source}: {len(boxes)} {a.split} boxes of {a.split_name}, "
        f"recall = best prior IoU >= {fit.threshold:g}",
        title_justify="left",
    )
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
    lines = [
        ("" if cur is None else f"aspect ratios besides 1: current {list(current.aspect_ratios[0])}; ")
        + f"fitted {list(fit.aspect_ratios)}",
        f"matcher recall: fitted {pct(fit.stats.recall)} (mean best IoU {fit.stats.mean_best_iou:.3f})"
        + (f", current {pct(cur.recall)} (mean best IoU {cur.mean_best_iou:.3f})" if cur else "")
        + f"; quantile start of the fit {pct(fit.quantile_stats.recall)}",
        f"boxes under {fit.stats.small_px:g} px at {size} px ({fit.stats.small_boxes}): recall fitted "
        f"{pct(fit.stats.small_recall)}" + (f", current {pct(cur.small_recall)}" if cur else ""),
        *fit.notes,
    ]
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    header = (
        f"# maskssd data anchors: {len(boxes)} boxes of {a.split_name}/{a.split}, maps "
        f"{list(layout.feature_maps)} at {size} px; matcher recall {pct(fit.stats.recall)}"
        + (f" (current {pct(cur.recall)})" if cur else "")
        + "\n"
    )
    snippet = header + fit.toml()
    out.print("\n[model]\n" + snippet, highlight=False, markup=False, soft_wrap=True)
    if a.out:
        path = Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(snippet)
        out.print(f"wrote {path}")
    return 0
