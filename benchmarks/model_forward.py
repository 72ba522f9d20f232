"""Benchmark: CPU inference speed of every maskssd detector next to torchvision's SSD300-VGG16 and
SSDLite320-MobileNetV3 (random weights, 4 classes): latency at batch 1 and throughput at batch 8.

What a row includes:
* maskssd rows: ``model(images)`` on a ready ``(N, 3, S, S)`` float batch in [0, 1]: normalisation, backbone,
  extra layers, heads, flattening; no decoding or NMS (see benchmarks.decode_nms for those: ~1-5 ms).
* "torchvision ... (full)": ``model.eval()(list_of_images)``: its GeneralizedRCNNTransform (normalise + resize to
  the model size; the inputs already have that size), backbone, head, box decoding, score filter, NMS, top-k.
  With random weights nearly every prior passes its 0.01 score threshold, so the post-processing is a worst case.
* "torchvision ... backbone+head": ``model.head(model.backbone(x))`` on a normalised batch: the part
  comparable to the maskssd rows.
* "channels_last": the maskssd model and input in ``torch.channels_last``.
Run: ``.venv/bin/python -m benchmarks.model_forward [--quick]``.

``--models SPEC ...`` times only the given maskssd models at batch 1 (``--size``, NHWC with ``--channels-last``),
the first row the baseline; a SPEC is a model name with optional build arguments, e.g.
``ssdlite_effnet_lite0:neck=fpn,neck_channels=64,stride4=true``::

    .venv/bin/python -m benchmarks.model_forward --threads 1 --channels-last --size 384 --models \\
        ssdlite_effnet_lite0 ssdlite_effnet_lite0:neck=fpn ssdlite_effnet_lite0:neck=pan ssdlite_effnet_lite1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from benchmarks._timing import (
    add_record_arg,
    add_threads_arg,
    machine,
    median_time,
    print_table,
    save_record,
    set_threads,
)
from maskssd.ssd.models import build_model

TV_SSD = "torchvision ssd300_vgg16 (full)"
TV_LITE = "torchvision ssdlite320_mobilenet_v3_large (full)"


def maskssd_runner(
    name: str, size: int, channels_last: bool = False, **kw
) -> Callable[[int], Callable[[], object]]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, input_size=size, pretrained=False, **kw).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def make(batch: int) -> Callable[[], object]:
        x = torch.rand(batch, 3, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return lambda: model(x)

    return make


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``name[:key=value,...]`` -> (name, build kwargs); values in TOML syntax (``64``, ``true``, ``"pan"``)."""
    from maskssd.training.config import parse_value

    name, _, args = spec.partition(":")
    kw = {}
    for item in filter(None, args.split(",")):
        k, _, v = item.partition("=")
        kw[k.strip()] = parse_value(v.strip())
    return name, kw


def run_specs(specs: list[str], size: int, channels_last: bool, repeat: int) -> None:
    """Batch-1 latency of each spec; the first is the baseline."""
    rows = []
    with torch.inference_mode():
        for spec in specs:
            name, kw = parse_spec(spec)
            model_size = kw.pop("input_size", size)
            b1 = median_time(
                maskssd_runner(name, model_size, channels_last, **kw)(1), repeat=repeat, warmup=2
            )
            rows.append({"name": spec, "seconds": b1, "baseline": specs[0] if spec != specs[0] else None})
            print(f"  {spec}: {b1 * 1e3:.1f} ms", file=sys.stderr, flush=True)
    print_table(
        f"Forward latency at batch 1, {size} px{', channels_last' if channels_last else ''} (median ms of "
        f"{repeat}; random weights, 4 classes; {machine()})",
        rows,
    )


def torchvision_runners(
    which: str,
) -> tuple[Callable[[int], Callable[[], object]], Callable[[int], Callable[[], object]], int]:
    from torchvision.models import detection

    torch.manual_seed(0)
    if which == "ssd300":
        model, size = detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4), 300
    else:
        model, size = (
            detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4),
            320,
        )
    model.eval()

    def full(batch: int) -> Callable[[], object]:
        images = [torch.rand(3, size, size) for _ in range(batch)]
        return lambda: model(images)

    def backbone_head(batch: int) -> Callable[[], object]:
        images, _ = model.transform([torch.rand(3, size, size) for _ in range(batch)])
        x = images.tensors

        def run() -> object:
            feats = model.backbone(x)
            return model.head(list(feats.values()))

        return run

    return full, backbone_head, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="runs per light-model measurement")
    parser.add_argument(
        "--vgg-repeat", type=int, default=3, help="runs per VGG16 measurement (~0.4 s per image)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs, no channels_last VGG row")
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="SPEC",
        help="time only these maskssd models at batch 1: NAME[:key=value,...]",
    )
    parser.add_argument("--size", type=int, default=384, help="input size of --models (default 384)")
    parser.add_argument("--channels-last", action="store_true", help="--models in NHWC")
    add_threads_arg(parser)
    add_record_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.default_allocator)
    if args.models:
        run_specs(args.models, args.size, args.channels_last, args.repeat)
        return
    rep, vgg_rep = (3, 1) if args.quick else (args.repeat, args.vgg_repeat)

    cases: list[tuple[str, Callable[[int], Callable[[], object]], bool, str | None, str]] = []
    tv_ssd_full, tv_ssd_bh, _ = torchvision_runners("ssd300")
    tv_lite_full, tv_lite_bh, _ = torchvision_runners("ssdlite")
    cases += [
        (TV_SSD, tv_ssd_full, True, None, "transform + net + decode/NMS (worst case, random weights)"),
        ("torchvision ssd300_vgg16 backbone+head", tv_ssd_bh, True, TV_SSD, "net only"),
        (
            "maskssd ssd300_vgg16 @300",
            maskssd_runner("ssd300_vgg16", 300),
            True,
            TV_SSD,
            "net only; conv4_3 L2 norm, 8732 priors",
        ),
        (TV_LITE, tv_lite_full, False, None, "transform + net + decode/NMS (worst case, random weights)"),
        ("torchvision ssdlite320 backbone+head", tv_lite_bh, False, TV_LITE, "net only"),
        (
            "maskssd ssdlite_mobilenet_v3 @320",
            maskssd_runner("ssdlite_mobilenet_v3", 320),
            False,
            TV_LITE,
            "net only",
        ),
        (
            "maskssd ssdlite_effnet_lite0 @320",
            maskssd_runner("ssdlite_effnet_lite0", 320),
            False,
            TV_LITE,
            "net only",
        ),
        (
            "maskssd ssdlite_effnet_lite0 @384",
            maskssd_runner("ssdlite_effnet_lite0", 384),
            False,
            TV_LITE,
            "net only",
        ),
        (
            "maskssd tiny @128",
            maskssd_runner("tiny", 128),
            False,
            TV_LITE,
            "net only; tests/quickstart model",
        ),
        (
            "maskssd ssdlite_mobilenet_v3 @320, channels_last",
            maskssd_runner("ssdlite_mobilenet_v3", 320, True),
            False,
            TV_LITE,
            "net only",
        ),
        (
            "maskssd ssdlite_effnet_lite0 @320, channels_last",
            maskssd_runner("ssdlite_effnet_lite0", 320, True),
            False,
            TV_LITE,
            "net only",
        ),
        ("maskssd tiny @128, channels_last", maskssd_runner("tiny", 128, True), False, TV_LITE, "net only"),
    ]
    if not args.quick:
        cases.append(
            (
                "maskssd ssd300_vgg16 @300, channels_last",
                maskssd_runner("ssd300_vgg16", 300, True),
                True,
                TV_SSD,
                "net only",
            )
        )

    rows = []
    with torch.inference_mode():
        for name, make, is_vgg, baseline, note in cases:
            r = vgg_rep if is_vgg else rep
            b1 = median_time(make(1), repeat=r + (1 if is_vgg else 0), warmup=1)
            b8 = median_time(make(8), repeat=r, warmup=0 if is_vgg else 1)
            rows.append(
                {
                    "name": name,
                    "seconds": b1,
                    "baseline": baseline,
                    "note": note,
                    "batch-8 images/s": f"{8 / b8:.1f}",
                }
            )
            print(f"  {name}: {b1 * 1e3:.1f} ms, {8 / b8:.1f} images/s", file=sys.stderr, flush=True)
    print_table(
        f"Forward latency at batch 1 (median ms; speed-up = batch-1 latency ratio) and throughput at "
        f"batch 8, random weights, 4 classes ({machine()}; {rep} runs, VGG {vgg_rep})",
        rows,
        extra_columns=["batch-8 images/s"],
    )

    save_record(args.record, "model_forward")


if __name__ == "__main__":
    main()
