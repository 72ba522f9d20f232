"""Benchmark: one CPU training step (forward, MultiBox loss, backward, SGD) with glibc's default allocator vs
with ``maskssd.runtime.tune_cpu_allocator`` (what every ``maskssd`` command does at start), with the
forward in bfloat16 autocast (``train.cpu_bf16``) vs float32, and on AVX2 (``avx2``: the child process held to
AVX2 as on a CPU without AVX-512, by ``benchmarks._isa``), with where the step's time goes (``--profile``: the
heaviest operators of one step, by PyTorch's profiler).

The allocator setting is per process, so each case runs in its own child process of this script, one after
the other, on the same inputs. Run: ``.venv/bin/python -m benchmarks.train_step [--quick] [--model NAME]
[--cases allocator,tuned,bf16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._isa import avx2 as avx2_emulation
from benchmarks._timing import (
    add_record_arg,
    add_threads_arg,
    machine,
    median_time,
    print_table,
    save_record,
)


def child(
    model_name: str,
    batch: int,
    size: int,
    repeat: int,
    threads: int | None,
    bf16: bool,
    freeze_stages: int = 0,
    channels_last: bool = False,
    do_profile: bool = False,
) -> None:
    import torch

    from maskssd.runtime import tune_cpu_allocator
    from maskssd.ssd.loss import MultiBoxLoss
    from maskssd.ssd.models import build_model
    from maskssd.training.predict import autocast

    tuned = tune_cpu_allocator()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=4, input_size=size, freeze_stages=freeze_stages).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = MultiBoxLoss(model.priors_cxcy)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    xy = torch.rand(batch, 3, 2, generator=g) * 0.6
    boxes = [torch.cat([c, c + 0.1 + 0.2 * torch.rand(3, 2, generator=g)], 1) for c in xy]
    labels = [torch.randint(1, 4, (3,), generator=g) for _ in range(batch)]

    def step() -> None:
        with autocast(torch.device("cpu"), False, cpu_bf16=bf16):
            locs, scores = model(images)
        out = loss_fn(locs, scores, boxes, labels)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()

    seconds = median_time(step, repeat, warmup=2)
    profile = None
    if do_profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        profile = [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events[:10]]
    isa = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"tuned": tuned, "seconds": seconds, "isa": isa, "profile": profile}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssdlite_effnet_lite0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 4 at 256 px, 3 steps")
    parser.add_argument(
        "--cases",
        default="allocator,tuned,bf16",
        help="comma-separated: allocator (glibc's defaults), tuned (maskssd's setting, float32), "
        "bf16 (tuned, forward in bfloat16 autocast), avx2 (tuned, PyTorch held to AVX2)",
    )
    parser.add_argument(
        "--freeze-stages", type=int, default=0, help="frozen backbone stages (the CPU config: 3)"
    )
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and input (the CPU config)")
    parser.add_argument(
        "--profile", action="store_true", help="also list the heaviest operators of one step (each case)"
    )
    add_record_arg(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    add_threads_arg(parser, allocator=False)  # this benchmark compares the two allocator settings itself
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.repeat = 4, 256, 3
    if args.child:
        return child(
            args.model,
            args.batch,
            args.size,
            args.repeat,
            args.threads,
            args.bf16,
            args.freeze_stages,
            args.channels_last,
            args.profile,
        )

    held = avx2_emulation() if "avx2" in args.cases.split(",") else None

    def run(tuning: str, bf16: bool = False, isa: str = "native") -> dict:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--child",
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--repeat",
            str(args.repeat),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if bf16:
            cmd.append("--bf16")
        cmd += ["--freeze-stages", str(args.freeze_stages)] + (
            ["--channels-last"] if args.channels_last else []
        )
        if args.profile:
            cmd.append("--profile")
        env = {**os.environ, "MASKSSD_MALLOC_TUNING": tuning, **(held.env if held and isa == "avx2" else {})}
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=root)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cases = set(args.cases.split(","))
    if args.threads:  # the children run the steps; this makes the title say how many threads they use
        import torch

        torch.set_num_threads(args.threads)
    name, tuned_name = "glibc default allocator", "maskssd tune_cpu_allocator"
    rows: list[dict] = []
    profiles: dict[str, list | None] = {}
    if "allocator" in cases:
        rows.append(
            {
                "name": name,
                "seconds": run("0")["seconds"],
                "note": "freed blocks > 128 KiB-32 MiB go back to the kernel",
            }
        )
    if "tuned" in cases:
        tuned = run("1")
        profiles["native"] = tuned.get("profile")
        rows.append(
            {
                "name": tuned_name,
                "baseline": name if "allocator" in cases else None,
                "seconds": tuned["seconds"],
                "note": "freed memory stays in the process" if tuned["tuned"] else "NOT applied (not glibc?)",
            }
        )
    if "bf16" in cases:
        from maskssd.training.predict import cpu_supports_bf16

        rows.append(
            {
                "name": "tuned + bfloat16 autocast (train.cpu_bf16)",
                "baseline": tuned_name if "tuned" in cases else None,
                "seconds": run("1", bf16=True)["seconds"],
                "note": "CPU has bf16 instructions"
                if cpu_supports_bf16()
                else "no bf16 instructions: emulated",
            }
        )
    if "avx2" in cases:
        avx2 = run("1", isa="avx2")
        rows.append(
            {
                "name": f"tuned, AVX2 (emulated: {held.how if held else '?'})",
                "baseline": tuned_name if "tuned" in cases else None,
                "seconds": avx2["seconds"],
                "note": "a CPU without AVX-512"
                + ("" if avx2.get("isa", "").startswith("AVX2") else " (NOT held!)"),
            }
        )
        profiles["avx2"] = avx2.get("profile")
    layout = f", {args.freeze_stages} frozen stages" + (", channels_last" if args.channels_last else "")
    print_table(
        f"One training step: {args.model}, batch {args.batch} x {args.size} px{layout}, forward + loss + "
        f"backward + SGD ({machine()}; median of {args.repeat})",
        rows,
    )
    for case, prof in profiles.items():
        if prof:
            title = f"where one step's time goes ({case}): self CPU time by operator"
            print_table(
                title, [{"name": n, "seconds": s, "note": f"{100 * f:.0f}% of the step"} for n, s, f in prof]
            )
    save_record(args.record, "train_step", {"model": args.model, "batch": args.batch, "size": args.size})


if __name__ == "__main__":
    main()
