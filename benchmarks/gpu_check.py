"""The one-command GPU check (issue 24): run it whenever a GPU is lent, in at most ~8 minutes on one GPU.

1. **Loss paths agree**: the MultiBox loss on the GPU (the batched tensor path) against the CPU's compiled
   kernels, on the same SSD300-sized batch: loss parts equal within float tolerance; both timed.
2. **Inference FPS** of the accurate model (random weights: speed does not depend on them) on the device:
   batch-1 end to end (a 640x480 frame: resize, forward, decode + NMS) and batched throughput.
3. **AMP training** of the accurate config (`experiments/cpu_effnet_lite0_pan_s4_rfs.toml`) for a few epochs:
   seconds per epoch, images per second, the first epochs' losses (finite, falling).
4. **The paper's SSD300 config** (`experiments/paper_ssd300.toml`) for as many epochs as its budget allows.

Training uses the real data when ``../shared`` is beside the project, else the quickstart's synthetic scenes,
and a throw-away MLflow store. Without a GPU (``--device cpu --tiny``) the same steps run at a tiny budget:
how the check itself is tested. Writes ``--record`` (default ``records/gpu_check.json``).

    bash benchmarks/gpu_check.sh                   # on the GPU machine
    python -m benchmarks.gpu_check --device cpu --tiny --record /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._timing import machine, save_record

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "face-mask-detection"
ACCURATE = REPO / "experiments" / "cpu_effnet_lite0_pan_s4_rfs.toml"
PAPER = REPO / "experiments" / "paper_ssd300.toml"
QUICK = REPO / "experiments" / "quickstart.toml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- 1. loss
def loss_paths(device: torch.device, batch: int, repeats: int) -> dict[str, Any]:
    from benchmarks.loss_matching import make_batch
    from maskssd.ssd.loss import MultiBoxLoss
    from maskssd.ssd.priors import PriorSpec

    priors = PriorSpec.ssd300().priors()
    locs, scores, boxes, labels = make_batch(batch, priors.shape[0])
    cpu_loss = MultiBoxLoss(priors)
    dev_loss = MultiBoxLoss(priors.to(device)).to(device)
    on = [x.to(device) for x in (locs, scores)]
    dev_boxes, dev_labels = [b.to(device) for b in boxes], [lb.to(device) for lb in labels]
    a = cpu_loss(locs, scores, boxes, labels)
    with tensor_path(device):
        b = dev_loss(*on, dev_boxes, dev_labels)
    parts = {k: (float(getattr(a, k)), float(getattr(b, k))) for k in ("total", "conf", "loc")}
    agree = all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5) for x, y in parts.values())
    return {
        "device": str(device),
        "batch": batch,
        "priors": int(priors.shape[0]),
        "parts_cpu_vs_device": parts,
        "agree": agree,
        "cpu_kernels_ms": 1000
        * timed(lambda: cpu_loss(locs, scores, boxes, labels), torch.device("cpu"), repeats),
        "device_ms": 1000
        * timed(lambda: _tensor(device, lambda: dev_loss(*on, dev_boxes, dev_labels)), device, repeats),
        "device_path": "tensor (batched)"
        if device.type != "cpu"
        else "tensor, forced on CPU (the GPU's code)",
    }


@contextlib.contextmanager
def tensor_path(device: torch.device) -> Any:
    """On a CPU, run the GPU's tensor code instead of the compiled kernels (what ``MASKSSD_CPU_KERNELS=0``
    does for a process), so the comparison means the same on a machine without a GPU."""
    from maskssd.ssd import kernels

    if device.type != "cpu":
        yield
        return
    before = kernels.__dict__.get("ENABLED", _MISSING)
    kernels.ENABLED = False
    try:
        yield
    finally:
        if before is _MISSING:
            del kernels.ENABLED
        else:
            kernels.ENABLED = before


_MISSING = object()


def _tensor(device: torch.device, fn: Any) -> Any:
    with tensor_path(device):
        return fn()


# ------------------------------------------------------------------------------------------ 2. FPS
def inference_fps(device: torch.device, repeats: int, batch: int) -> dict[str, Any]:
    from benchmarks.inference_fps import CLASSES, DECODE, LITE, PAN_S4, camera_frame
    from maskssd.deploy.optimize import optimize_for_inference
    from maskssd.deploy.predictor import Predictor
    from maskssd.ssd.models import build_model

    model = build_model("ssdlite_effnet_lite0", num_classes=4, **{**LITE, **PAN_S4}).eval()
    model = optimize_for_inference(model).to(device)
    pred = Predictor(
        model,
        CLASSES,
        model.input_size,
        model.priors_cxcy.to(device),
        DECODE,
        device=device,
        channels_last=True,
    )
    frame = camera_frame()
    one = timed(lambda: pred.predict([frame]), device, repeats)
    many = timed(lambda: pred.predict([frame] * batch), device, max(3, repeats // 4))
    return {
        "model": "ssdlite_effnet_lite0 384 cpu pan s4 (the accurate config's network), eager folded NHWC",
        "batch1_ms": 1000 * one,
        "batch1_fps": 1 / one,
        "batch": batch,
        "batched_images_per_s": batch / many,
    }


# -------------------------------------------------------------------------------------- 3, 4. training
def train(config: Path, sets: list[str], store: Path, budget_s: float, name: str) -> dict[str, Any]:
    """``maskssd train CONFIG --set ...`` in a child process with a time budget; its per-epoch metrics."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    argv = [sys.executable, "-m", "maskssd", "train", str(config), "--run-name", name]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MASKSSD_CHECKPOINT_DIR": str(store / "checkpoints")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget_s)
        status, tail = ("finished" if proc.returncode == 0 else "failed"), proc.stderr[-1500:]
    except subprocess.TimeoutExpired as e:
        status, tail = "budget reached", (e.stderr or b"")[-1500:].decode(errors="replace")
    wall = time.perf_counter() - t0
    c = MlflowClient(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], f"attributes.run_name = '{name}'")
    out: dict[str, Any] = {
        "config": str(config.relative_to(REPO)),
        "set": sets,
        "status": status,
        "wall_s": wall,
    }
    if not runs:
        return {**out, "error": tail}
    rid = runs[0].info.run_id

    def curve(key: str) -> list[float]:
        return [m.value for m in sorted(c.get_metric_history(rid, key), key=lambda m: m.step)]

    out.update(
        epochs=len(curve("train/loss")),
        train_loss=curve("train/loss"),
        epoch_seconds=curve("train/epoch_seconds"),
        images_per_second=curve("train/images_per_second"),
        val_map=curve("val/map"),
    )
    if status == "failed":
        out["error"] = tail
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny budget: how the check is tested on CPU")
    p.add_argument("--record", default=str(REPO / "records" / "gpu_check.json"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tiny = a.tiny or device.type != "cuda"
    data = REAL if REAL.is_dir() and not tiny else None
    report: dict[str, Any] = {"device": str(device), "tiny": tiny}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    started = time.time()

    print("1/4 loss paths ...", flush=True)
    report["loss"] = loss_paths(device, 8 if tiny else 32, 3 if tiny else 20)
    print(f"    agree: {report['loss']['agree']}", flush=True)
    print("2/4 inference FPS ...", flush=True)
    report["fps"] = inference_fps(device, 3 if tiny else 50, 4 if tiny else 32)
    print(f"    batch-1 {report['fps']['batch1_fps']:.1f} FPS", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        synth = (
            store / "synth"
        )  # tiny: 40 synthetic scenes, made here (no real data is needed to test the check)
        if data is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "maskssd",
                    "data",
                    "synth",
                    str(synth),
                    "--images",
                    "40",
                    "--seed",
                    "0",
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
        where = [f'data.root="{data}"'] if data else [f'data.root="{synth}"', 'data.split_name="default"']
        common = [
            'data.final_split="none"',
            "train.log_images=0",
            "eval.bootstrap=0",
            f'experiment.device="{a.device}"',
        ]
        print("3/4 AMP training, accurate config ...", flush=True)
        sets = [*common, "train.amp=true", f"train.epochs={2 if tiny else 6}", "train.eval_every=1"]
        sets += ["schedule.warmup_epochs=1", *where]
        sets += ["model.input_size=128", "data.batch_size=4"] if tiny else []
        report["train_accurate"] = train(ACCURATE, sets, store, 120 if tiny else 200, "gpu-accurate")
        print(
            f"    {report['train_accurate'].get('epochs')} epochs, {report['train_accurate']['status']}",
            flush=True,
        )
        print("4/4 the paper's SSD300 ...", flush=True)
        sets = [
            *common,
            'model.init_checkpoint=""',
            f"train.epochs={1 if tiny else 100}",
            "train.eval_every=5",
        ]
        sets += [*where] + (["data.batch_size=4"] if tiny else [])
        if not (REPO / "checkpoints" / "ssd300_PascalVOC.pth").is_file():
            report["paper_note"] = (
                "no Pascal VOC checkpoint offline: VGG16 from random weights (speed, not mAP)"
            )
        report["train_paper"] = train(PAPER, sets, store, 150 if tiny else 180, "gpu-paper")
        print(
            f"    {report['train_paper'].get('epochs')} epochs, {report['train_paper']['status']}", flush=True
        )
    report["wall_s"] = time.time() - started
    report["machine"] = machine()
    save_record(a.record, "gpu_check", {"report": report})
    ok = report["loss"]["agree"] and all(
        report[k].get("epochs", 0) >= 1 and all(map(math.isfinite, report[k].get("train_loss", [math.nan])))
        for k in ("train_accurate", "train_paper")
    )
    print(f"record: {a.record}; {'OK' if ok else 'PROBLEMS: read the record'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
