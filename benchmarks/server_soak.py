"""Benchmark: ``maskssd serve`` under a long run of camera traffic: does its memory stay flat and its latency
bounded? (A benchmark table, not a timed test.)

One real server (``python -m maskssd serve``, bearer tokens on, dynamic batching) on loopback is warmed up, then
``--clients`` camera clients (threads with keep-alive ``httpx`` clients, each its own token) send ``--requests``
640x480 JPEG frames in all. The server process's resident memory (RSS, ``psutil``) is sampled after warm-up and
at every tenth of the run; latencies are the clients' (p50, p95, p99, max). Reported: RSS growth from the first
tenth to the end (the warm-up allocations are not growth), the latency percentiles per tenth (a slow creep shows
as a rising p99), and any refused request.
Run: ``.venv/bin/python -m benchmarks.server_soak [--requests 5000] [--clients 4] [--record FILE]``.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks._timing import add_record_arg, machine, record_rich, save_record
from benchmarks.server_throughput import ServerProcess, camera_jpegs, save_checkpoint


def soak(url: str, tokens: list[str], total: int, frames: list[bytes], pid: int) -> tuple[list, list]:
    """Send ``total`` frames from one client per token; ``(per-tenth rows, refused codes)``."""
    proc = psutil.Process(pid)
    tenth = max(total // 10, 1)
    lock = threading.Lock()
    lat: list[float] = []
    refused: list[int] = []
    counter = [0]
    rows: list[dict] = []

    def client(token: str) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {token}"}) as c:
            while True:
                with lock:
                    if counter[0] >= total:
                        return
                    counter[0] += 1
                    k = counter[0]
                t0 = time.perf_counter()
                r = c.post("/detect", content=frames[k % len(frames)], headers={"content-type": "image/jpeg"})
                dt = time.perf_counter() - t0
                with lock:
                    (lat.append(dt) if r.status_code == 200 else refused.append(r.status_code))
                    if k % tenth == 0:
                        rows.append({"done": k, "rss_mb": proc.memory_info().rss / 2**20, "lat": list(lat)})
                        lat.clear()

    threads = [threading.Thread(target=client, args=(t,)) for t in tokens]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return rows, refused


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=5000, help="frames sent in all (default 5000)")
    p.add_argument("--clients", type=int, default=4, help="camera clients (default 4)")
    p.add_argument("--model", default="tiny", choices=("tiny", "ssdlite_effnet_lite0"))
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0)
    add_record_arg(p)
    a = p.parse_args(argv)
    frames = camera_jpegs()
    tokens = [secrets.token_urlsafe(24) for _ in range(a.clients)]
    with tempfile.TemporaryDirectory(prefix="maskssd-soak-") as tmp:
        ckpt = save_checkpoint(
            a.model,
            {"input_size": a.input_size, "pretrained": False}
            if a.model != "tiny"
            else {"input_size": a.input_size},
            Path(tmp) / "m.pt",
        )
        srv = ServerProcess(ckpt, True, a, Path(tmp) / "server.log")
        srv.cmd += ["--rate-limit", "0"]
        srv.env = {"MASKSSD_SERVE_TOKENS": ",".join(tokens)}
        srv.start().wait_ready()
        try:
            with httpx.Client(
                base_url=srv.url, timeout=60, headers={"authorization": f"Bearer {tokens[0]}"}
            ) as c:
                for k in range(50):  # warm-up: every batch size, the allocator's pools
                    c.post("/detect", content=frames[k % len(frames)], headers={"content-type": "image/jpeg"})
            rss0 = psutil.Process(srv.proc.pid).memory_info().rss / 2**20
            t0 = time.perf_counter()
            rows, refused = soak(srv.url, tokens, a.requests, frames, srv.proc.pid)
            wall = time.perf_counter() - t0
        finally:
            srv.stop()
    t = Table(
        title=f"maskssd serve soak: {a.requests} frames from {a.clients} camera clients, {a.model} {a.input_size} "
        f"({a.backend} backend, tokens on; {machine()})"
    )
    for col in ("frames done", "RSS MB", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right")
    t.add_row("warm-up", f"{rss0:.0f}", "", "", "", "")
    for r in rows:
        q = (
            statistics.quantiles(r["lat"], n=100, method="inclusive")
            if len(r["lat"]) > 1
            else [r["lat"][0]] * 99
        )
        t.add_row(
            str(r["done"]),
            f"{r['rss_mb']:.0f}",
            f"{1000 * q[49]:.0f}",
            f"{1000 * q[94]:.0f}",
            f"{1000 * q[98]:.0f}",
            f"{1000 * max(r['lat']):.0f}",
        )
    console = Console(width=150)
    console.print(record_rich(t))
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if rows else float("nan")
    console.print(
        f"{a.requests / wall:.1f} frames/s; RSS {rows[0]['rss_mb']:.0f} MB after the first tenth, {rows[-1]['rss_mb']:.0f} "
        f"MB at the end: growth {growth:+.1f} MB; refused: {len(refused)} ({sorted(set(refused))})",
        highlight=False,
    )
    save_record(
        a.record,
        "server_soak",
        {
            "frames": a.requests,
            "clients": a.clients,
            "rss_growth_mb": growth,
            "refused": len(refused),
            "frames_per_second": a.requests / wall,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
