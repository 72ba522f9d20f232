"""Benchmark: ``maskssd serve`` throughput and latency with dynamic batching on vs off.

For each model two real servers (``python -m maskssd serve``, batching off and on) start as subprocesses on
loopback, are warmed up, then take turns being driven by 1, 4 and 8 concurrent clients (threads with
keep-alive ``httpx`` clients), each sending ``--requests`` 640x480 JPEG camera frames as raw bodies. Reported: requests per second, p50/p95
latency seen by the clients, and the mean batch size from the server's ``/metrics``. The batching-off run
of the same model and concurrency is the baseline of the speed-up column. ``--backend onnx --model-workers 2``
adds a batching server whose two model workers (ONNX Runtime replicas) take batches side by side.
Run: ``.venv/bin/python -m benchmarks.server_throughput [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from benchmarks._timing import add_record_arg, record_rich, save_record
from maskssd.ssd.checkpoint import atomic_save
from maskssd.ssd.models import build_model

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]
DECODE = {
    "min_score": 0.01,
    "max_overlap": 0.45,
    "top_k": 200,
    "class_agnostic": False,
    "pre_nms_top_k": None,
}
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("tiny 128", "tiny", {"input_size": 128}),
    ("ssdlite_effnet_lite0 320", "ssdlite_effnet_lite0", {"input_size": 320, "pretrained": False}),
]


def save_checkpoint(name: str, kwargs: dict[str, Any], path: Path) -> Path:
    torch.manual_seed(0)
    m = build_model(name, num_classes=4, **kwargs)
    return atomic_save(
        {
            "format": 1,
            "model": m.state_dict(),
            "build_args": m.build_args,
            "class_names": CLASSES,
            "decode": DECODE,
            "epoch": 0,
        },
        path,
    )


def camera_jpegs(n: int = 16) -> list[bytes]:
    """``n`` different 640x480 JPEG frames (about 40 kB each, like a real camera at quality 85)."""
    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:480, 0:640]
    for _ in range(n):
        img = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4)) % 256] * 3, -1)
        img = (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        for _ in range(5):
            x, y, s = int(rng.integers(0, 560)), int(rng.integers(0, 400)), int(rng.integers(30, 90))
            img[y : y + s, x : x + s] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m maskssd serve`` in a subprocess; ``stop`` sends SIGTERM, then SIGKILL."""

    def __init__(self, ckpt: Path, batching: bool, args: argparse.Namespace, log: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "maskssd",
            "serve",
            "--model",
            str(ckpt),
            "--port",
            str(self.port),
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--backend",
            args.backend,
            "--rate-limit",  # every client here is one loopback address: measure the server, not its limit
            "0",
        ]
        if not batching:
            self.cmd.append("--no-batching")
        if workers > 1:
            self.cmd += ["--model-workers", str(workers)]
        self.log = log
        self.threads = args.threads
        self.env: dict[str, str] = {}  # more of the server's environment (tokens)

    def start(self) -> ServerProcess:
        self.log_file = self.log.open("w")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)  # torch's intra-op threads in the server
        env.update(self.env)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/livez", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log_file.close()


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    s = c = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for smp in fam.samples:
            if smp.name == "maskssd_batch_size_sum":
                s = smp.value
            elif smp.name == "maskssd_batch_size_count":
                c = smp.value
    return s, c


def drive(url: str, clients: int, requests: int, frames: list[bytes]) -> dict[str, float]:
    """``clients`` threads, ``requests`` each, started together; latencies and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(ci: int) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=120) as c:
            c.get("/health")  # open the connection before the clock starts
            barrier.wait()
            for ri in range(requests):
                body = frames[(ci * requests + ri) % len(frames)]
                t0 = time.perf_counter()
                r = c.post(
                    "/detect", content=body, headers={"content-type": "image/jpeg", "x-camera": f"cam{ci}"}
                )
                mine.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    with lock:
                        errors.append(f"{r.status_code} {r.text[:200]}")
        with lock:
            latencies.extend(mine)

    b0 = batch_stats(url)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    b1 = batch_stats(url)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "rps": len(latencies) / wall,
        "p50": 1000 * statistics.median(latencies),
        "p95": 1000 * q[18],
        "batch": (b1[0] - b0[0]) / max(b1[1] - b0[1], 1),
        "n": len(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests per client (6 instead of 30)")
    p.add_argument("--requests", type=int, help="requests per client")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--models", nargs="+", help="only models whose label contains one of these words")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument(
        "--model-workers",
        type=int,
        default=1,
        help="also a batching server with N model workers (ONNX Runtime replicas, cores/N threads each)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in the server (OMP_NUM_THREADS; 0 = torch's default, the physical cores)",
    )
    add_record_arg(p)
    a = p.parse_args(argv)
    n_req = a.requests or (6 if a.quick else 30)
    console = Console(width=None if sys.stdout.isatty() else 150)
    frames = camera_jpegs()
    console.print(
        f"{len(frames)} JPEG frames of 640x480, {sum(map(len, frames)) / len(frames) / 1e3:.0f} kB on "
        f"average; {n_req} requests per client",
        highlight=False,
    )
    results: list[tuple[str, int, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="maskssd-serve-bench-") as tmp:
        for label, name, kwargs in [m for m in MODELS if not a.models or any(w in m[0] for w in a.models)]:
            ckpt = save_checkpoint(name, kwargs, Path(tmp) / f"{name}.pt")
            # both servers run side by side and take turns, so a change of machine load hits both alike
            t0 = time.perf_counter()
            kinds = ["off", "on"] + ([f"on, {a.model_workers} workers"] if a.model_workers > 1 else [])
            servers = {
                k: ServerProcess(
                    ckpt, k != "off", a, Path(tmp) / f"server-{i}.log", 1 if i < 2 else a.model_workers
                )
                for i, k in enumerate(kinds)
            }
            try:
                for srv in servers.values():
                    srv.start()
                for srv in servers.values():
                    srv.wait_ready()
                console.print(f"{label}: servers up in {time.perf_counter() - t0:.1f} s", highlight=False)
                for srv in servers.values():
                    drive(srv.url, max(a.clients), 2, frames)  # warm-up: every batch size the run will see
                for clients in a.clients:
                    for batching, srv in servers.items():
                        r = drive(srv.url, clients, n_req, frames)
                        results.append((label, clients, batching, r))
                        console.print(
                            f"  batching {batching}, {clients} clients: "
                            f"{r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, "
                            f"mean batch {r['batch']:.2f}",
                            highlight=False,
                        )
            finally:
                for srv in servers.values():
                    if hasattr(srv, "proc"):
                        srv.stop()

    base = {(m, c): r["rps"] for m, c, b, r in results if b == "off"}
    t = Table(
        title=f"maskssd serve on loopback ({a.backend} backend{f', {a.threads} torch threads' if a.threads else ''}"
        f", max batch {a.max_batch}, max wait "
        f"{a.max_wait_ms:g} ms; {n_req} requests per client; speed-up vs batching off)"
    )
    for col in (
        "model",
        "clients",
        "batching",
        "requests",
        "req/s",
        "p50 ms",
        "p95 ms",
        "mean batch",
        "speed-up",
    ):
        t.add_column(col, justify="left" if col in ("model", "batching") else "right")
    order = {"off": 0, "on": 1}
    for label, clients, batching, r in sorted(results, key=lambda x: (x[0], x[1], order.get(x[2], 2))):
        ref = base.get((label, clients))
        t.add_row(
            label,
            str(clients),
            batching,
            str(r["n"]),
            f"{r['rps']:.1f}",
            f"{r['p50']:.0f}",
            f"{r['p95']:.0f}",
            f"{r['batch']:.2f}",
            f"{r['rps'] / ref:.2f}x" if ref else "-",
        )
    console.print(record_rich(t))
    save_record(a.record, "server_throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
