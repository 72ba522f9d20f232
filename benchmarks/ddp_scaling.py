"""Benchmark: training images/s with 1 and 2 data-parallel processes (torchrun, gloo on CPU; NCCL on GPUs).

Each configuration is a real ``maskssd train`` run (same global batch: 16 in one process, 8 per process in two)
on a synthetic dataset; images/s is read back from the MLflow run (median over epochs after the first, which
pays for start-up). The one-process run is the baseline. Run:
``.venv/bin/python -m benchmarks.ddp_scaling [--quick] [--model tiny|ssdlite_effnet_lite0]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks._timing import add_record_arg, machine, record_rich, save_record

CONFIG = """\
[experiment]
name = "ddp-bench"
seed = 0
device = "{device}"

[data]
root = "{root}"
split_name = "default"
synthetic = {{ images = {images}, seed = 0 }}
batch_size = {batch}
final_split = "none"

[model]
name = "{model}"
input_size = {size}
pretrained = false

[train]
epochs = {epochs}
eval_every = {epochs}
log_images = 0

[eval]
coco = false
"""


def run(tmp: Path, nproc: int, args: argparse.Namespace) -> tuple[float, float]:
    batch = args.global_batch // nproc
    cfg = tmp / f"cfg{nproc}.toml"
    cfg.write_text(
        CONFIG.format(
            device=args.device,
            root=tmp / "synth",
            images=args.images,
            batch=batch,
            model=args.model,
            size=args.size,
            epochs=args.epochs,
        )
    )
    uri = f"sqlite:///{tmp}/mlflow.db"
    base = [
        "-m",
        "maskssd",
        "train",
        str(cfg),
        "--no-progress",
        "--tracking-uri",
        uri,
        "--run-name",
        f"p{nproc}",
    ]
    cmd = (
        [sys.executable, *base]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *base,
        ]
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, text=True)
    from maskssd import tracking

    c = tracking.client(uri)
    r = [x for x in tracking.runs_table(c, "ddp-bench") if x.info.run_name == f"p{nproc}"][0]
    hist = sorted(c.get_metric_history(r.info.run_id, "train/images_per_second"), key=lambda m: m.step)
    secs = sorted(c.get_metric_history(r.info.run_id, "train/epoch_seconds"), key=lambda m: m.step)
    steady = hist[1:] or hist
    return statistics.median(m.value for m in steady), statistics.median(m.value for m in (secs[1:] or secs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="2 epochs on 120 images")
    add_record_arg(p)
    args = p.parse_args()
    if args.quick:
        args.epochs, args.images = 2, 120
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {n: run(tmp, n, args) for n in args.nproc}
    base = results[args.nproc[0]][0]
    t = Table(
        title=f"DDP training throughput: {args.model} @{args.size}, {args.device} ({machine()})",
        title_justify="left",
    )
    for col in ("processes", "batch per process", "images/s (median epoch)", "epoch s", "vs 1 process"):
        t.add_column(col, justify="right")
    for n, (ips, sec) in results.items():
        t.add_row(str(n), str(args.global_batch // n), f"{ips:.1f}", f"{sec:.1f}", f"{ips / base:.2f}x")
    Console().print(record_rich(t))

    save_record(args.record, "ddp_scaling")


if __name__ == "__main__":
    main()
