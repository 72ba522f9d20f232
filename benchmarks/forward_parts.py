"""Benchmark: where a trained model's forward spends its time on ONNX Runtime (the CPU default), by part of the
model: each backbone stage, the neck, the heads and the rest, from ONNX Runtime's own per-node profile of
``--runs`` batch-1 calls. The whole forward (the sum of every node) is the baseline of the share column.

Issue 27 asks where the accurate model's time goes before choosing what to make cheaper: a part's share says
what removing it could buy at most. ``--isa native avx2`` also profiles as on a CPU without AVX-512 or VNNI
(``benchmarks._isa``; a child process). Node names come from the exported graph (``/backbone/blocks.1/...``):
a part is a backbone stage (``backbone/blocks.1``), the neck, the extra layers, or both heads at every level.
Run: ``.venv/bin/python -m benchmarks.forward_parts --checkpoint best.pt --isa native avx2 --threads 2``.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._isa import add_isa_arg, tables_per_isa
from benchmarks._timing import PRINTED, add_record_arg, machine, record_table, save_record

#: The parts whose own layers are grouped one level deeper (the backbone's stages).
DEEP = ("backbone",)


def part_of(node: str) -> str:
    """The model part a node of the exported graph belongs to (see the module's docstring)."""
    parts = [p for p in node.split("/") if p]
    if len(parts) < 2:
        return "other (reshapes, concatenations, layout)"
    if parts[0] in DEEP:
        return "/".join(parts[:2])
    top = parts[0].split(".")[0]  # cls_head.3 -> cls_head: every level of a head together
    return "heads (box and class, every level)" if top in ("loc_head", "cls_head") else top


def profile(onnx_path: Path, input_size: int, runs: int, threads: int) -> dict[str, float]:
    """Microseconds per call of each part over ``runs`` calls (after 5 untimed ones), the total under ``""``."""
    import onnxruntime as ort

    from maskssd.deploy.export import onnx_session_options

    warm = ort.InferenceSession(
        str(onnx_path), onnx_session_options(threads), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((1, 3, input_size, input_size), dtype=np.float32)
    feed = {warm.get_inputs()[0].name: x}
    for _ in range(5):
        warm.run(None, feed)
    with tempfile.TemporaryDirectory() as tmp:
        so = onnx_session_options(threads)
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        for _ in range(5 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_call: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * (5 + runs))
    calls = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    starts = sorted(e["ts"] for e in calls)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1  # the call this node ran in
        per_call[part_of(e["name"].removesuffix("_kernel_time"))][max(i, 0)] += e["dur"]
    out = {k: float(np.median(v[5:])) for k, v in per_call.items()}  # the untimed calls left out
    out[""] = sum(out.values())
    return out


def rows_of(times: dict[str, float]) -> list[list[str]]:
    total = times[""]
    parts = sorted(((k, v) for k, v in times.items() if k), key=lambda kv: -kv[1])
    rows = [["whole forward (every node)", f"{total / 1000:.2f}", "100.0%"]]
    return rows + [[k, f"{v / 1000:.2f}", f"{100 * v / total:.1f}%"] for k, v in parts]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained model's checkpoint (best.pt)")
    p.add_argument("--runs", type=int, default=40, help="profiled calls (default 40)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--label", help="the model's name in the title (default: the checkpoint's path)")
    add_isa_arg(p)
    add_record_arg(p)
    a = p.parse_args(argv)
    PRINTED.clear()
    tables = tables_per_isa(a, "benchmarks.forward_parts", argv, run)
    if tables is None:  # the AVX2 child: its table is written
        return
    from rich.console import Console
    from rich.table import Table

    for title, rows in tables:
        t = Table(title=title, title_justify="left")
        for col, just in (("part", "left"), ("ms per call", "right"), ("share", "right")):
            t.add_column(col, justify=just)
        for r in rows:
            t.add_row(*r)
        Console(width=max(Console().width, 120)).print(t)
        record_table(title, ["part", "ms per call", "share"], rows)
    save_record(a.record, "forward_parts", {"checkpoint": str(a.checkpoint), "isa": a.isa})


def run(a: argparse.Namespace) -> tuple[str, list[list[str]]]:
    from maskssd.deploy.export import onnx_cache_path, onnx_session_for
    from maskssd.ssd.checkpoint import load, load_detector

    model, _ = load_detector(load(a.checkpoint), "cpu")
    onnx_session_for(a.checkpoint, model)  # the export the predictor runs, cached next to the checkpoint
    path = onnx_cache_path(a.checkpoint)
    times = profile(path, model.input_size, a.runs, a.threads)
    title = (
        f"ONNX Runtime forward by part: {a.label or a.checkpoint} ({model.input_size} px, batch 1, median of "
        f"{a.runs} calls; {machine()})"
    )
    return title, rows_of(times)


if __name__ == "__main__":
    main()
