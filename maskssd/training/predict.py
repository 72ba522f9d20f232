"""Running a model over a split: the device and mixed-precision helpers, one pass that gives the loss and every
image's detections as records (:func:`predict` -> :class:`~maskssd.evaluation.records.EvalSet`), and the
per-epoch evaluation built on it (:func:`evaluate`). The final report scores the same records once more with
intervals and error analysis (:mod:`maskssd.evaluation.report`), for a run and for ``maskssd evaluate`` alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from maskssd.data import Batch
from maskssd.evaluation.metrics import EvalResult, evaluate_set
from maskssd.evaluation.records import Detections, EvalSet, Target
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.postprocess import DecodeSpec, postprocess
from maskssd.ssd.tta import hflip_forward, mirror_permutation, tta_priors
from maskssd.training import distributed

__all__ = ["autocast", "cpu_supports_bf16", "evaluate", "predict", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX): without them CPU autocast to bfloat16
    emulates and is slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(
    device: torch.device, enabled: bool, cpu_bf16: bool = False
) -> contextlib.AbstractContextManager:
    """Mixed precision: ``enabled`` on GPU (bfloat16, else float16); ``cpu_bf16`` on a CPU with bf16 support."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    class_names: tuple[str, ...],
    device: torch.device,
    loss_fn: MultiBoxLoss | None = None,
    decode: DecodeSpec | None = None,
    detections: bool = True,
    amp: bool = False,
    prefix: str = "val",
    channels_last: bool = False,
    tta_hflip: bool = False,
) -> tuple[dict[str, float], EvalSet | None]:
    """One pass over a split: the loss (and its parts) with ``loss_fn``, and with ``detections`` every image's
    detections in original pixels with its ground truth, as an :class:`EvalSet` in dataset order.

    ``tta_hflip``: detections from the images and their mirrors, merged before NMS (:mod:`maskssd.ssd.tta`);
    the loss stays the plain images'. Ground truth is the annotation's pixel boxes where the dataset has
    annotations (what a saved file re-scores against). In a distributed run each rank predicts its shard;
    losses are averaged and images gathered, in dataset order, so every metric equals the single-process value.
    """
    model.eval()
    sums = torch.zeros(
        4, dtype=torch.float64, device=device
    )  # total, conf, loc, batches: one sync at the end
    records: list[tuple[int, str, Detections, Target, tuple[int, int]]] = []
    annotations = getattr(loader.dataset, "annotations", None)
    order = {a.image_id: i for i, a in enumerate(annotations)} if annotations is not None else {}
    priors = model.priors_cxcy
    perm = mirror_permutation(model.prior_spec).to(priors.device) if tta_hflip else None
    if perm is not None:
        priors = tta_priors(priors)
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, amp):
                (locs, scores), (det_locs, det_scores) = _eval_forward(
                    model, batch.images, channels_last, perm
                )
            if loss_fn is not None:
                out = loss_fn(locs, scores, batch.boxes, batch.labels)
                sums[:3] += torch.stack([out.total, out.conf, out.loc]).double()
                sums[3] += 1
            if detections:
                dets = postprocess(det_locs, det_scores, priors, decode or DecodeSpec(), batch.sizes)
                records.extend(_records(batch, dets, annotations, order, len(records)))
    sums = distributed.all_reduce_sum(sums.cpu())
    if detections and distributed.active():
        records = [r for part in distributed.gather_objects(records) for r in part]
    records.sort(key=lambda r: r[0])
    metrics: dict[str, float] = {}
    if loss_fn is not None:
        mean = (sums[:3] / max(float(sums[3]), 1.0)).tolist()
        metrics = {f"{prefix}_loss": mean[0], f"{prefix}_loss_conf": mean[1], f"{prefix}_loss_loc": mean[2]}
    if not detections:
        return metrics, None
    evalset = EvalSet(class_names)
    for _, image_id, det, target, size in records:
        evalset.add(image_id, det, target, size)
    return metrics, evalset


def _records(
    batch: Batch, dets: Sequence[Detections], annotations: Any, order: Mapping[str, int], start: int
) -> list[tuple[int, str, Detections, Target, tuple[int, int]]]:
    """``(dataset position, image id, detections, ground truth, (width, height))`` of a batch's images."""
    out = []
    for k, (image_id, d) in enumerate(zip(batch.image_ids, dets)):
        if image_id in order:
            ann = annotations[order[image_id]]
            target, size = Target.from_annotation(ann), (int(ann.width), int(ann.height))
        else:
            w, h = batch.sizes[k].tolist()
            scale = torch.tensor([w, h, w, h], device=batch.boxes[k].device)
            target = Target.of(
                (batch.boxes[k] * scale).cpu(), batch.labels[k].cpu(), batch.difficult[k].cpu()
            )
            size = (int(w), int(h))
        out.append((order.get(image_id, start + k), image_id, d.to_cpu(), target, size))
    return out


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    class_names: tuple[str, ...],
    device: torch.device,
    loss_fn: MultiBoxLoss | None = None,
    decode: DecodeSpec | None = None,
    compute_map: bool = True,
    coco: bool = False,
    amp: bool = False,
    prefix: str = "val",
    channels_last: bool = False,
    tta_hflip: bool = False,
) -> tuple[dict[str, float], EvalResult | None]:
    """Loss (and its parts) on a split and, with ``compute_map``, every detection metric, in one pass
    (:func:`predict`, then :func:`~maskssd.evaluation.metrics.evaluate_set`; COCO only when asked: it is
    the slow part)."""
    metrics, evalset = predict(
        model,
        loader,
        class_names=class_names,
        device=device,
        loss_fn=loss_fn,
        decode=decode,
        detections=compute_map,
        amp=amp,
        prefix=prefix,
        channels_last=channels_last,
        tta_hflip=tta_hflip,
    )
    if evalset is None:
        return metrics, None
    result = evaluate_set(evalset, coco=coco)
    return {**metrics, **result.as_metrics(prefix)}, result


def _eval_forward(
    model: nn.Module, images: torch.Tensor, channels_last: bool, perm: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The predictions for the loss and those to decode: the same, or (with the mirror permutation ``perm``)
    the latter merged with the mirrored images' predictions."""

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    if perm is None:
        out = forward(images)
        return out, out
    return hflip_forward(forward, images, perm)
