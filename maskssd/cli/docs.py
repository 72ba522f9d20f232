"""``maskssd docs``: the docs' tables rendered from the committed records (``records/*.json``, each written by
the command that measured it with ``--record``), so that no result is typed by hand.

A page marks a generated block with ``<!-- maskssd:NAME -->`` and ``<!-- /maskssd:NAME -->``; ``maskssd docs``
replaces what lies between with the table ``NAME`` renders from the records (``--check``: only say which
pages differ, exit 1 if any; the test suite runs it). A table whose records are missing says so, with the
command that makes them.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from maskssd.cli.console import err, out
from maskssd.cli.docs_base import CLASSES, SHORT, Records, ci, mean_std, missing, pct, source, table, where
from maskssd.cli.docs_base import minutes as _minutes
from maskssd.cli.docs_errors import oof_confusion, t_oof_errors
from maskssd.cli.docs_levers import t_baseline_folds, t_compare, t_levers
from maskssd.cli.docs_rule import realtime_goal, realtime_verdict, verdict

__all__ = ["BLOCK", "TABLES", "cmd_docs", "render_page", "render_pages"]

BLOCK = re.compile(r"(<!-- maskssd:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /maskssd:(?P=name) -->)", re.S)


def _split(rec: Mapping[str, Any], split: str) -> str:
    """``mean ± std`` over a parent's children (each seed's 95% interval width alongside), or one run's CI."""
    if rec.get("aggregate"):
        agg, kids = rec["aggregate"], rec.get("children", [])
        if f"{split}_map_mean" not in agg:
            return "–"
        widths = [
            (
                k["metrics"].get(f"{split}_map_ci_high", math.nan)
                - k["metrics"].get(f"{split}_map_ci_low", math.nan)
            )
            / 2
            for k in kids
            if f"{split}_map_ci_low" in k.get("metrics", {})
        ]
        half = f" (CI ±{100 * sum(widths) / len(widths):.0f} per seed)" if widths else ""
        return f"{mean_std(agg, f'{split}_map')}{half}"
    m = rec.get("run", {}).get("metrics", {})
    return ci(m.get(f"{split}_map"), m.get(f"{split}_map_ci_low"), m.get(f"{split}_map_ci_high"))


# -------------------------------------------------------------------------------------------- tables
def t_shipped(r: Records) -> str:
    """The shipped configurations: minutes per run, val/test mAP with intervals, FPS, on the CPU named."""
    rows, notes = [], []
    fps = r.get("bench_inference_fps")
    fps_by_model = _fps_rows(fps)
    for name, config, what in (
        ("quickstart", "experiments/quickstart.toml", "tiny model, synthetic scenes"),
        ("fast_seeds", "experiments/cpu_effnet_lite0.toml", "SSDLite-EfficientNet-Lite0, 384 px"),
        ("accurate_seeds", "experiments/cpu_effnet_lite0_pan_s4_rfs.toml", "+ PAN, stride-4 map, RFS"),
    ):
        rec = r.get(name)
        f = fps_by_model.get(FPS_MODEL.get(Path(config).stem, ""), {})
        fps_cell = f.get(FPS_BACKEND) or "–"  # its own record: shown without the accuracy one
        if rec is None:
            rows.append([f"`{config}`", what, "–", "–", "–", "–", fps_cell])
            notes.append(
                missing(name, how=f"maskssd train {config} --seeds 0,1,2 --record records/{name}.json")
            )
            continue
        seeds = len(rec.get("seeds") or [rec.get("run", {}).get("seed")])
        rows.append(
            [
                f"`{config}`",
                what,
                str(seeds),
                _minutes(rec),
                _split(rec, "val"),
                _split(rec, "test"),
                fps_cell,
            ]
        )
        notes.append(f"{Path(config).stem}: {where(rec)}, {source(rec, name)}")
    if fps is not None:
        notes.append(
            "FPS: end to end, batch 1, a 640x480 frame, ONNX Runtime float one frame at a time (the default "
            "on a CPU without VNNI; int8 and frames in flight, what `detect` runs on a video with VNNI: "
            f"the Benchmarks page); {where(fps)}, {source(fps, 'bench_inference_fps')}"
        )
    notes.append(
        "min/run: a run's epochs x its median epoch time (a resume's gap left out), median over seeds"
    )
    head = ["config", "model", "seeds", "min/run", "val mAP", "test mAP", "FPS"]
    return table(head, rows, "llrrrrr") + "\n\n" + "\n".join(f"- {n}" for n in notes)


#: The network of a shipped config, as ``benchmarks/inference_fps.py`` labels it; the backend its FPS shows.
FPS_MODEL = {
    "cpu_effnet_lite0": "ssdlite_effnet_lite0 384 cpu",
    "cpu_effnet_lite0_pan_s4_rfs": "ssdlite_effnet_lite0 384 cpu pan s4",
}
FPS_BACKEND = "onnx folded"  # the float default of a CPU without VNNI; one column of bench_inference_fps


def _fps_rows(rec: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """model label -> its row of the FPS-per-backend table on the CPU's native ISA (the column is "ISA";
    "PyTorch ISA" in records from before the CPUID emulation)."""
    for tab in (rec or {}).get("tables", []):
        col = next((c for c in ("ISA", "PyTorch ISA") if c in tab.get("columns", [])), None)
        if col:
            return {row["model"]: row for row in tab["rows"] if row.get(col) == "native"}
    return {}


def t_per_class(r: Records) -> str:
    """Each seed of the accurate configuration per class, val and test, with 95% intervals; the paper beside."""
    rec, paper = r.get("accurate_seeds"), r.get("paper")
    rows = []
    if paper:
        for split in ("val", "test"):
            p = paper["results"][split]
            rows.append([f"paper ({p['note']})", split, pct(p["map"]), *[pct(p["ap"][c]) for c in CLASSES]])
    if rec is None:
        body = table(["model", "split", "mAP", *[SHORT[c] for c in CLASSES]], rows)
        how = "maskssd train experiments/cpu_effnet_lite0_pan_s4_rfs.toml --seeds 0,1,2 --record records/accurate_seeds.json"
        return body + "\n\n" + missing("accurate_seeds", how=how)
    for split in ("val", "test"):
        for kid in rec["children"]:
            m = kid["metrics"]
            if f"{split}_map" not in m:
                continue
            cells = [
                ci(
                    m.get(f"{split}_ap_{c}"),
                    m.get(f"{split}_ap_{c}_ci_low"),
                    m.get(f"{split}_ap_{c}_ci_high"),
                )
                for c in CLASSES
            ]
            rows.append(
                [
                    f"seed {kid['seed']}",
                    split,
                    ci(m[f"{split}_map"], m.get(f"{split}_map_ci_low"), m.get(f"{split}_map_ci_high")),
                    *cells,
                ]
            )
        agg = rec["aggregate"]
        if f"{split}_map_mean" in agg:
            rows.append(
                [
                    f"**mean ± std** ({len(rec['children'])} seeds)",
                    split,
                    mean_std(agg, f"{split}_map"),
                    *[mean_std(agg, f"{split}_ap_{c}") for c in CLASSES],
                ]
            )
    body = table(["model", "split", "mAP [95% CI]", *[SHORT[c] for c in CLASSES]], rows, "llrrrr")
    return body + f"\n\n{where(rec)}; {source(rec, 'accurate_seeds')}."


def t_oof(r: Records) -> str:
    """Cross-validation parents: pooled out-of-fold AP per class with its interval, and the per-fold mean."""
    rows, notes = [], []
    for name, label in (
        ("accurate_folds", "shipped accurate recipe"),
        ("winner_folds", "the study's winner"),
        ("accurate320_folds", "the recipe at 320 px (issue 27)"),
    ):
        rec = r.get(name)
        if rec is None:
            notes.append(missing(name, how=f"maskssd train CONFIG --folds 3 --record records/{name}.json"))
            continue
        agg = rec["aggregate"]
        cells = [
            ci(agg.get(f"oof_ap_{c}"), agg.get(f"oof_ap_{c}_ci_low"), agg.get(f"oof_ap_{c}_ci_high"))
            for c in CLASSES
        ]
        rows.append(
            [
                label,
                f"{rec['folds']} x {len(rec['seeds'])}",
                ci(agg.get("oof_map"), agg.get("oof_map_ci_low"), agg.get("oof_map_ci_high")),
                *cells,
                mean_std(agg, "val_map"),
            ]
        )
        notes.append(f"{label}: {where(rec)}, {source(rec, name)}")
    head = ["recipe", "folds x seeds", "out-of-fold mAP", *[SHORT[c] for c in CLASSES], "per-fold mAP"]
    return table(head, rows, "llrrrrr") + "\n\n" + "\n".join(f"- {n}" for n in notes)


def t_winner_vs_accurate(r: Records) -> str:
    """The paired out-of-fold comparison of the study's winner (A) and the shipped recipe (B), then the verdict
    of the rule written before it (:mod:`maskssd.cli.docs_rule`)."""
    name = "winner_vs_accurate_oof"
    rec = r.get(name)
    body = t_compare(name)(r)
    if rec is None:
        return body
    return body + verdict(rec, r.get("winner_folds"), r.get("winner_seeds"), _minutes, where)


def t_realtime_goal(r: Records) -> str:
    """Issue 27's goal, per backend, frames in flight or not, natively and held to AVX2 (the rule's numbers in
    :data:`maskssd.cli.docs_rule.REALTIME_GOAL`)."""
    rec = r.get("bench_realtime_decode")
    if rec is None:
        return t_bench("bench_realtime_decode")(r)
    return realtime_goal(rec) + f"\n\n{where(rec)}; {source(rec, 'bench_realtime_decode')}."


def t_realtime_candidate(r: Records) -> str:
    """Issue 27's cheaper accurate model (the recipe at 320 px): paired out of fold against the shipped recipe,
    its real-time path, and the verdict of the rule written before it was trained."""
    parts = [t_compare("accurate320_vs_accurate_oof")(r)]
    how = (
        "python -m benchmarks.realtime_decode --checkpoint BEST_PT --isa native avx2 --record records/{}.json"
    )
    parts.append(t_bench("bench_realtime_decode_320", how.format("bench_realtime_decode_320"))(r))
    parts.append(realtime_verdict(r.get("accurate320_vs_accurate_oof"), r.get("bench_realtime_decode_320")))
    return "\n\n".join(parts)


def t_study(r: Records) -> str:
    rec = r.get("study_rare_folds")
    if rec is None:
        return missing(
            "study_rare_folds",
            how="maskssd study-report cpu_rare_folds --record records/study_rare_folds.json",
        )
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(rec["states"].items()))
    wall = rec.get("wall_seconds")
    head = ["trial", "state", "value", "steps", "minutes", "params"]
    rows = []
    for t in rec["trials"]:
        params = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in t["params"].items()
        )
        minutes = f"{t['seconds'] / 60:.0f}" if t.get("seconds") else "–"
        value = f"{t['value']:.4f}" if t.get("value") is not None else "–"
        rows.append(
            [str(t["number"]), t["state"].lower(), value, str(max(t["steps"], default="–")), minutes, params]
        )
    fid = rec.get("fidelity") or {}
    rho = fid.get("spearman")
    check = (
        f"Spearman ρ between a trial's fold-rung value and its out-of-fold value: {rho:+.2f} over {fid.get('n')} trials."
        if isinstance(rho, float) and not math.isnan(rho)
        else "The rank check needs 3 trials that ran every fold."
    )
    return (
        f"{len(rec['trials'])} trials ({states}) in {wall / 3600:.2f} h of wall time ({where(rec)}). {check}\n\n"
        + table(head, rows, "rlrrrl")
        + oof_confusion(
            rec.get("best_oof_errors"),
            f"trial {rec['best']['number']}" if rec.get("best") else "the best trial",
            "at the study's fidelity",
        )
        + f"\n\n{source(rec, 'study_rare_folds')}."
    )


def t_bench(name: str, how: str | None = None) -> Callable[[Records], str]:
    """A benchmark record's tables; ``how``: the command that makes it (default: its module's, bare)."""

    def render(r: Records) -> str:
        rec = r.get(name)
        if rec is None:
            bare = f"python -m benchmarks.{name.removeprefix('bench_')} --record records/{name}.json"
            return missing(name, how=how or bare)
        parts = []
        for tab in rec["tables"]:
            cols = tab["columns"]
            parts.append(
                f"**{tab['title']}**\n\n"
                + table(cols, [[str(row.get(c, "")) for c in cols] for row in tab["rows"]])
            )
        return "\n\n".join(parts) + f"\n\n{where(rec)}; {source(rec, name)}."

    return render


def t_goal(r: Records) -> str:
    """The accurate configuration's seed means against the paper, per class and split: the difference, in
    points, and whether the goal (above the paper on every class on both splits) is met."""
    rec, paper = r.get("accurate_seeds"), r.get("paper")
    if rec is None or paper is None:
        how = "maskssd train experiments/cpu_effnet_lite0_pan_s4_rfs.toml --seeds 0,1,2 --record records/accurate_seeds.json"
        return missing("accurate_seeds", how=how)
    agg, rows = rec["aggregate"], []
    n = len(rec.get("children", []))
    for split in ("val", "test"):
        ours = {"map": agg.get(f"{split}_map_mean"), **{c: agg.get(f"{split}_ap_{c}_mean") for c in CLASSES}}
        theirs = {"map": paper["results"][split]["map"], **paper["results"][split]["ap"]}
        cells = []
        for k in ("map", *CLASSES):
            if ours[k] is None:
                cells.append("–")
                continue
            diff = 100 * (ours[k] - theirs[k])
            cells.append(f"{pct(ours[k])} vs {pct(theirs[k])}: {diff:+.1f} {'met' if diff >= 0 else 'short'}")
        rows.append([f"{split} ({n} seeds)", *cells])
    return (
        table(["split", "mAP", *[SHORT[c] for c in CLASSES]], rows)
        + f"\n\n- {where(rec)}, {source(rec, 'accurate_seeds')}"
    )


def t_avx2_training(r: Records) -> str:
    """The accurate recipe's minutes per run on this CPU (:func:`_minutes`) and an estimate for the same CPU held
    to AVX2: those minutes times the AVX2/native ratio of one training step (``benchmarks/train_step.py``)."""
    seeds, step = r.get("accurate_seeds"), r.get("bench_train_step")
    how = "python -m benchmarks.train_step --cases tuned,avx2 --record records/bench_train_step.json"
    if seeds is None or step is None:
        return missing("accurate_seeds", "bench_train_step", how=how)
    rows = {row["case"]: row for tab in step["tables"][:1] for row in tab["rows"]}
    native = rows.get("maskssd tune_cpu_allocator")
    held = next((row for case, row in rows.items() if case.startswith("tuned, AVX2")), None)
    minutes = _minutes(seeds)
    if native is None or held is None or minutes == "–":
        return missing("bench_train_step", how=how)
    ratio = float(held["median ms"]) / float(native["median ms"])
    how = held["case"].removeprefix("tuned, ")
    body = table(
        ["accurate recipe", "min/run", "from"],
        [
            ["this CPU", minutes, f"epochs x median epoch, median of {len(seeds.get('children', []))} seeds"],
            [how, f"~{float(minutes) * ratio:.0f}", f"x {ratio:.2f}: one training step, AVX2 / native"],
        ],
        align="lrl",
    )
    return (
        body
        + f"\n\n- {where(seeds)}, {source(seeds, 'accurate_seeds')}\n- {where(step)}, {source(step, 'bench_train_step')}"
    )


TABLES: dict[str, Callable[[Records], str]] = {
    "goal": t_goal,
    "avx2-training": t_avx2_training,
    "shipped": t_shipped,
    "per-class": t_per_class,
    "oof": t_oof,
    "oof-errors": t_oof_errors,
    "winner-vs-accurate": t_winner_vs_accurate,
    "int8-vs-float": t_compare("int8_vs_float_val"),
    "realtime-candidate": t_realtime_candidate,
    "realtime-goal": t_realtime_goal,
    "levers": t_levers,
    "baseline-folds": t_baseline_folds,
    "study": t_study,
}


# ------------------------------------------------------------------------------------------- pages
def load_records(folder: Path) -> dict[str, dict[str, Any]]:
    from maskssd.provenance import read_record

    return {p.stem: read_record(p) for p in sorted(folder.glob("*.json"))}


def render_page(text: str, records: Records) -> str:
    """``text`` with every generated block rendered again."""

    def sub(m: re.Match[str]) -> str:
        name = m["name"]
        render = TABLES.get(name) or (
            t_bench("bench_" + name[6:].replace("-", "_")) if name.startswith("bench-") else None
        )
        if render is None:
            raise KeyError(f"unknown table {m['name']!r} (known: {', '.join(TABLES)})")
        return m.group(1) + render(records).rstrip() + "\n" + m.group(4)

    return BLOCK.sub(sub, text)


def render_pages(pages: Sequence[Path], records: Records) -> dict[Path, str]:
    """Every page's text with its blocks rendered (the pages that have none are left out)."""
    out_: dict[Path, str] = {}
    for page in pages:
        text = page.read_text()
        if BLOCK.search(text):
            out_[page] = render_page(text, records)
    return out_


def cmd_docs(a: argparse.Namespace) -> int:
    root = Path(a.root)
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    rendered = render_pages(pages, load_records(root / "records"))
    stale = [p for p, text in rendered.items() if p.read_text() != text]
    if a.check:
        for p in stale:
            err.print(f"{p}: its tables differ from the records (run maskssd docs)", highlight=False)
        return 1 if stale else 0
    for p in stale:
        p.write_text(rendered[p])
        out.print(f"rendered {p}", highlight=False)
    out.print(f"{len(rendered)} pages with tables, {len(stale)} changed", highlight=False)
    return 0


#: A number that reads as a result: a decimal (``70.2``, ``0.95``), a percentage or a ratio (``2.4x``).
_NUMBER = re.compile(r"(?<![\w.\-/])(\d+\.\d+|\d+(?:\.\d+)?\s?%|\d+(?:\.\d+)?x)(?![\w.])")


#: A software version (``Python 3.11``, ``MLflow 3.17``): not a result.
_VERSION = re.compile(
    r"\b(?:Python|MLflow|PyTorch|torch|torchvision|Optuna|ONNX Runtime|version)\s+\d+(?:\.\d+)+"
)


def typed_numbers(text: str) -> list[tuple[int, str]]:
    """``(line, number)`` of every result-like number outside generated blocks, code blocks, inline code,
    links, HTML comments and software versions: what the docs may not hold, since only records may put
    numbers there."""
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found, fenced = [], False
    for i, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = _VERSION.sub(" ", re.sub(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->|<[^>]+>", " ", line))
        found += [(i, m.group(1)) for m in _NUMBER.finditer(prose)]
    return found


# ------------------------------------------------------------------------------ the config reference
def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """``(class, field) -> comment``: the comment on a field's line, else the comment lines just above it, in
    the config module's source (where the keys are explained once)."""
    import ast

    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = [
                ln.split("#", 1)[1].strip() for ln in lines[item.lineno - 1 : item.end_lineno] if "#" in ln
            ]
            above, k = [], item.lineno - 2
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            out[(node.name, item.target.id)] = " ".join(above + text)
    return out


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    return "`" + (repr(value) if not isinstance(value, str) else f'"{value}"') + "`"


def config_reference(_: Records) -> str:
    """Every key of an experiment config, by section: type, default and what it does, from the schema
    (:mod:`maskssd.training.config`) and the comments beside its fields."""
    import inspect

    from maskssd.training import config as schema

    comments = _field_comments(inspect.getsource(schema))
    parts = []
    for section, info in schema.ExperimentConfig.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, schema._Section)):
            continue
        rows = []
        for key, field in model.model_fields.items():
            kind = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            doc = comments.get((model.__name__, key), "").replace("|", "\\|")
            rows.append([f"`{section}.{key}`", f"`{kind}`".replace("|", "\\|"), _default(field), doc])
        head = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        parts.append(
            f"### `[{section}]`\n\n"
            + (head + "\n\n" if head else "")
            + table(["key", "type", "default", ""], rows, "llll")
        )
    return "\n\n".join(parts)


TABLES["config-reference"] = config_reference
