"""The training-side levers of issue 16, each off by default: repeat-factor sampling, copy-paste of rare-class
faces, class-balanced weights, EMA of the weights, one-cycle and SGDR schedules, progressive input sizes and
bfloat16 autocast on CPU. Off, each leaves training as it was; on, each does what it says; a run with all of
them on still resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskssd.data import FaceMaskDataset, load_split, sample_seed
from maskssd.data.copy_paste import CopyPaste, build_face_bank, feathered
from maskssd.data.sampling import RepeatFactorSampler, epoch_batches, no_single_last_batch, repeat_factors
from maskssd.data.transforms import AugmentSpec, sample_iou_crop, train_transform
from maskssd.data.voc import Annotation
from maskssd.errors import ConfigError, MaskSSDError, TrainingInterrupted
from maskssd.ssd.models import build_model
from maskssd.training.build import build_loader
from maskssd.training.config import ScheduleSection, load_config, validate
from maskssd.training.ema import ModelEma
from maskssd.training.levers import SizeSchedule, configure_train_data
from maskssd.training.optim import build_scheduler, lr_factor
from maskssd.training.predict import autocast, cpu_supports_bf16
from tests.conftest import write_tiny_experiment


def _ann(i: int, labels: list[int]) -> Annotation:
    boxes = np.array([[0, 0, 10, 10]] * len(labels), np.float32).reshape(-1, 4)
    return Annotation(
        f"im{i}", Path(f"im{i}.png"), Path(f"im{i}.xml"), 20, 20, boxes, np.array(labels, np.int64),
        np.zeros(len(labels), bool),
    )  # fmt: skip


def _cfg(tmp_path: Path, root: Path | str = "x", **overrides):
    return load_config(write_tiny_experiment(tmp_path / "exp.toml", Path(root)), overrides)


# ------------------------------------------------------------------------------- repeat-factor sampling
def test_repeat_factors_follow_lvis():
    # class 1 in every image, class 2 in half, class 3 in one image of ten; one image without objects
    anns = [_ann(i, [1] + ([2] if i % 2 else []) + ([3] if i == 3 else [])) for i in range(9)] + [_ann(9, [])]
    r = repeat_factors(anns, 0.5)
    f3, f2 = 1 / 10, 4 / 10  # images 1, 3, 5, 7 hold class 2
    assert r[3] == pytest.approx(math.sqrt(0.5 / f3))  # the rarest of its classes decides
    assert r[1] == pytest.approx(math.sqrt(0.5 / f2)) and r[0] == 1.0 and r[9] == 1.0
    assert (repeat_factors(anns, 0.0) == 1).all()


def test_repeat_factor_sampler_draws_each_epoch_from_seed_and_epoch():
    factors = np.array([1.0, 1.0, 2.5, 1.2, 3.0, 1.0, 1.0])
    s = RepeatFactorSampler(factors, seed=4)
    epochs = []
    for epoch in range(1, 41):
        s.set_epoch(epoch)
        keys = list(s)
        assert len(keys) == len(s) == s.epoch_length(epoch)
        counts = np.bincount([i for _, i in keys], minlength=len(factors))
        assert ((counts == np.floor(factors)) | (counts == np.floor(factors) + 1)).all(), counts
        assert len({k for k, _ in keys}) == len(keys)  # every repeat gets its own augmentation seed
        epochs.append(keys)
    assert s.expected_images == pytest.approx(factors.sum())
    assert np.mean([len(k) for k in epochs]) == pytest.approx(factors.sum(), abs=0.4)
    again = RepeatFactorSampler(factors, seed=4)
    again.set_epoch(7)
    assert list(again) == epochs[6]  # a resumed run draws the same epoch
    assert epochs[6] != epochs[7]
    first = [k for k in epochs[0] if k[1] == 0][0]
    assert first[0] == sample_seed(4, 1, 0)  # an image's first appearance: the plain sampler's seed

    # two ranks: equal, padded shards that together hold the single-process epoch
    single = RepeatFactorSampler(factors, seed=4)
    single.set_epoch(3)
    shards = []
    for rank in range(2):
        r = RepeatFactorSampler(factors, seed=4, rank=rank, num_replicas=2)
        r.set_epoch(3)
        shards.append(list(r))
    assert len(shards[0]) == len(shards[1]) == -(-len(single) // 2)
    merged = [k for pair in zip(*shards, strict=True) for k in pair]
    assert merged[: len(single)] == list(single)

    # never a last batch of one sample (BatchNorm cannot train on it at a 1x1 map)
    assert (no_single_last_batch(17, 8), no_single_last_batch(16, 8), no_single_last_batch(17, 1)) == (
        18,
        16,
        17,
    )
    sized = RepeatFactorSampler(factors, seed=4, batch_size=4)
    for epoch in range(1, 30):
        sized.set_epoch(epoch)
        assert len(list(sized)) == len(sized) and len(sized) % 4 != 1


def test_repeat_factor_loader_and_exact_schedule(synth_root, tmp_path):
    cfg = _cfg(tmp_path, synth_root, **{"data.repeat_factor_threshold": 0.6, "train.epochs": 4})
    ds = FaceMaskDataset(load_split(synth_root, "train", "default"), train_transform(64))
    levers = configure_train_data(cfg, ds, 96)
    assert isinstance(levers.sampler, RepeatFactorSampler) and levers.varying_epochs
    assert levers.params["data.expected_images_per_epoch"] > len(ds)
    loader = build_loader(ds, 8, sampler=levers.sampler)
    lengths = [epoch_batches(loader, e) for e in range(1, 5)]
    assert len(set(lengths)) > 1 or lengths[0] > -(-len(ds) // 8)
    for e in (1, 2):
        loader.sampler.set_epoch(e)
        assert sum(1 for _ in loader.batch_sampler) == lengths[e - 1]
    # the schedule is at epoch e exactly when epoch e starts, however long the epochs before it were
    sched_cfg = ScheduleSection(name="cosine", warmup_epochs=1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_scheduler(opt, sched_cfg, 4, lengths)
    for e, n in enumerate(lengths):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(sched_cfg, 4, float(e)), abs=1e-12)
        for _ in range(n):
            opt.step()
            sched.step()
    # off: the default sampler and the one-count schedule, as before
    off = configure_train_data(_cfg(tmp_path, synth_root), ds, 96)
    assert off.sampler is None and not off.varying_epochs and off.params == {}


# ------------------------------------------------------------------------------------------ copy-paste
def _paste_dataset(tmp_path: Path, voc_xml) -> FaceMaskDataset:
    """Image 0: noise with an incorrectly-worn-mask face (label 3) at (20, 10)-(44, 40); images 1-3: flat grey
    with one small with-mask face in a corner."""
    from tests.conftest import write_kaggle_dataset

    rng = np.random.default_rng(0)
    samples = {
        "src": (
            Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)),
            voc_xml("src.png", 70, 60, [("mask_weared_incorrect", 20, 10, 44, 40)]),
        )
    }
    for k in range(3):
        samples[f"dst{k}"] = (
            Image.new("RGB", (160, 120), (90, 90, 90)),
            voc_xml(f"dst{k}.png", 160, 120, [("with_mask", 2, 2, 22, 22)]),
        )
    root = write_kaggle_dataset(tmp_path / "cp", samples)
    return FaceMaskDataset.from_root(root, None, cache_images=True)


def test_face_bank_crops_with_a_margin(tmp_path, voc_xml):
    ds = _paste_dataset(tmp_path, voc_xml)
    bank = build_face_bank(ds, [3], margin=0.25)
    assert len(bank) == 1 and bank[0].label == 3 and bank[0].source == "src"
    crop = bank[0]
    assert crop.pixels.shape == (3, 30 + 2 * 8, 24 + 2 * 6)  # margins of ceil(0.25 x size) on each side
    x1, y1, x2, y2 = (int(v) for v in crop.box)
    assert (x1, y1, x2 - x1, y2 - y1) == (6, 8, 24, 30)
    src = ds.raw_sample(ds.annotations.index(next(a for a in ds.annotations if a.image_id == "src")))
    assert torch.equal(crop.pixels[:, y1:y2, x1:x2], src["image"][:, 10:40, 20:44])


def _pasted(sample: dict, before: dict):
    n = before["boxes"].shape[0]
    return sample["boxes"][n:], sample["labels"][n:]


def test_pasted_boxes_land_exactly_on_the_pasted_face(tmp_path, voc_xml):
    ds = _paste_dataset(tmp_path, voc_xml)
    src_i = next(i for i, a in enumerate(ds.annotations) if a.image_id == "src")
    face = ds.raw_sample(src_i)["image"][:, 10:40, 20:44]
    bank = build_face_bank(ds, [3])
    step = CopyPaste(bank, p=1.0, max_faces=1, scale=(1.0, 1.0))
    dst = next(i for i, a in enumerate(ds.annotations) if a.image_id != "src")
    flips = set()
    for seed in range(12):
        raw = ds.raw_sample(dst)
        out = step(raw, seed)
        boxes, labels = _pasted(out, raw)
        assert len(boxes) == 1 and (labels == 3).all() and not out["difficult"].any()
        assert torch.equal(out["boxes"][:1], raw["boxes"]) and out["labels"][0] == 1  # the original box stays
        x1, y1, x2, y2 = boxes[0].tolist()
        assert x1 == int(x1) and y1 == int(y1) and (x2 - x1, y2 - y1) == (24, 30)
        region = out["image"][:, int(y1) : int(y2), int(x1) : int(x2)]
        same, mirrored = torch.equal(region, face), torch.equal(region, face.flip(-1))
        assert same or mirrored
        flips.add(mirrored)
        assert torch.equal(raw["image"], ds.raw_sample(dst)["image"])  # the source sample is not modified
    assert flips == {True, False}
    many = CopyPaste(bank, p=1.0, max_faces=4)
    counts = set()
    for seed in range(12):
        out = many(ds.raw_sample(dst), seed)
        counts.add(out["boxes"].shape[0] - 1)
        ious = _iou(out["boxes"].numpy())
        np.fill_diagonal(ious, 0)
        assert ious.max() < 0.1  # nothing pasted onto a face, nor onto another pasted one
    assert len(counts) > 1 and max(counts) > 1


def test_pasted_faces_follow_their_scaled_boxes(tmp_path, voc_xml):
    """With scale jitter the face (a flat colour inside a differently coloured margin) fills its box."""
    ds = _paste_dataset(tmp_path, voc_xml)
    src_i = next(i for i, a in enumerate(ds.annotations) if a.image_id == "src")
    img = np.full((60, 70, 3), 200, dtype=np.uint8)
    img[10:40, 20:44] = 30
    Image.fromarray(img).save(ds.annotations[src_i].image_path)  # a new file: the image cache reads it anew
    step = CopyPaste(build_face_bank(ds, [3], margin=0.3), p=1.0, max_faces=1, scale=(0.6, 1.7))
    dst = next(i for i, a in enumerate(ds.annotations) if a.image_id != "src")
    sizes = set()
    for seed in range(10):
        raw = ds.raw_sample(dst)
        out = step(raw, seed)
        for x1, y1, x2, y2 in _pasted(out, raw)[0].tolist():
            sizes.add(round(x2 - x1, 3))
            inner = out["image"][:, math.ceil(y1) + 1 : int(y2) - 1, math.ceil(x1) + 1 : int(x2) - 1]
            assert inner.numel() and int(inner.max()) <= 40, (seed, x1, y1, x2, y2)
            ring = out["image"][:, max(int(y1) - 3, 0), math.ceil(x1) : int(x2)]  # just above the face
            assert int(ring.min()) >= 150
    assert len(sizes) > 3


def _iou(b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area[:, None] + area[None, :] - inter)


def test_copy_paste_is_seeded_and_off_changes_nothing(synth_root, tmp_path):
    anns = load_split(synth_root, "train", "default")
    plain = FaceMaskDataset(anns, train_transform(64), cache_images=True)
    pasted = FaceMaskDataset(anns, train_transform(64), cache_images=True)
    cfg = _cfg(tmp_path, synth_root, **{"augment.copy_paste_p": 0.8, "augment.copy_paste_max": 3})
    levers = configure_train_data(cfg, pasted, 96)
    assert pasted.sample_step is not None and levers.params["augment.copy_paste_bank_faces"] > 0
    assert all(c.label == 3 for c in pasted.sample_step.bank)  # the rarest class by default
    keys = [(sample_seed(0, 1, i), i) for i in range(len(anns))]
    a, b = [pasted[k] for k in keys], [pasted[k] for k in keys]
    assert all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b)
    )
    pasted.transform = None  # raw samples: count the faces added
    more = [pasted[k]["labels"].numel() - anns[k[1]].num_objects for k in keys]
    assert min(more) >= 0 and sum(m > 0 for m in more) >= len(keys) // 2
    other = [pasted[(k[0] + 1, k[1])]["labels"].numel() - anns[k[1]].num_objects for k in keys]
    assert other != more
    # off: the same samples as a dataset without the step
    off = FaceMaskDataset(anns, train_transform(64), cache_images=True)
    configure_train_data(_cfg(tmp_path, synth_root), off, 96)
    assert off.sample_step is None
    for k in keys[:6]:
        x, y = off[k], plain[k]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["boxes"], y["boxes"])
    step = CopyPaste(pasted.sample_step.bank, p=0.0)
    raw = plain.raw_sample(0)
    assert step(raw, 5) is raw


def test_feathered_paste_keeps_the_face_and_fades_its_margin():
    patch = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    under = torch.full((3, 20, 30), 0, dtype=torch.uint8)
    box = np.array([5.0, 4.0, 25.0, 16.0])  # the face, in the patch's pixels
    out = feathered(patch, under, box)
    assert torch.equal(out[:, 4:16, 5:25], patch[:, 4:16, 5:25])  # the face is the patch's, untouched
    row = out[0, 10].tolist()  # across the face's middle: rises from the image to the face, then falls
    assert row[0] < 40 and row[-1] < 40 and row[0] < row[2] < row[4] <= 200
    assert int(out[0, 0, 0]) < int(out[0, 2, 2]) < int(out[0, 4, 5])  # the corner fades in both directions
    assert torch.equal(feathered(patch, patch, box), patch)  # blending a patch onto itself changes nothing


def test_feather_blend_pastes_faces_without_a_seam(tmp_path, voc_xml):
    ds = _paste_dataset(tmp_path, voc_xml)
    bank = build_face_bank(ds, [3], margin=0.3)
    dst = next(i for i, a in enumerate(ds.annotations) if a.image_id != "src")
    hard = CopyPaste(bank, p=1.0, max_faces=1, scale=(1.0, 1.0))
    soft = CopyPaste(bank, p=1.0, max_faces=1, scale=(1.0, 1.0), blend="feather")
    a, b = hard(ds.raw_sample(dst), 3), soft(ds.raw_sample(dst), 3)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])  # same draws
    x1, y1, x2, y2 = (int(v) for v in a["boxes"][-1].tolist())
    assert torch.equal(a["image"][:, y1:y2, x1:x2], b["image"][:, y1:y2, x1:x2])  # the face itself
    assert not torch.equal(a["image"], b["image"])  # its margin is blended
    with pytest.raises(ValueError, match="blend"):
        CopyPaste(bank, p=1.0, blend="poisson")


def test_crop_around_a_rare_face_keeps_it_whole():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [150.0, 120.0, 170.0, 145.0]])
    for _ in range(200):
        crop = sample_iou_crop(boxes, 200, 160, keep=boxes[1])
        if crop is None:
            continue
        left, top, w, h, kept = crop
        assert left <= 150 and top <= 120 and left + w >= 170 and top + h >= 145 and bool(kept[1])
    spec = AugmentSpec(
        photometric_p=0, zoom_out_p=0, iou_crop_p=1.0, hflip_p=0, crop_keep_p=1.0, crop_keep_labels=(3,)
    )
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.zeros((3, 160, 200), dtype=torch.uint8))
    labels = torch.tensor([1, 3])
    for seed in range(30):
        torch.manual_seed(seed)
        sample = {
            "image": image,
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(160, 200)),
            "labels": labels,
            "difficult": torch.zeros(2, dtype=torch.bool),
        }
        out = train_transform(64, spec)(sample)
        assert 3 in out["labels"].tolist()  # the rare face is never cropped away


def test_crop_keep_classes_default_to_the_rarest_and_are_checked(tmp_path, synth_root):
    from maskssd.training.levers import augment_spec

    cfg = _cfg(tmp_path, synth_root, **{"augment.crop_keep_p": 0.5})
    spec = augment_spec(cfg, {"with_mask": 50, "without_mask": 10, "mask_weared_incorrect": 2})
    assert spec.crop_keep_labels == (3,) and spec.crop_keep_p == 0.5
    assert augment_spec(_cfg(tmp_path, synth_root), {"with_mask": 5}).crop_keep_labels == ()
    with pytest.raises(ConfigError, match="crop_keep_classes"):
        _cfg(tmp_path, synth_root, **{"augment.crop_keep_classes": ["nose"]})


# --------------------------------------------------------------------------------- class-balanced loss
def test_class_balanced_weights(tmp_path):
    counts = {"with_mask": 2125, "without_mask": 518, "mask_weared_incorrect": 88}
    cfg = _cfg(tmp_path, **{"loss.class_balance_beta": 0.999})
    cfg.loss.class_weights = {}
    w = cfg.class_weight_list(counts)

    def inv_effective(n: int) -> float:
        return (1 - 0.999) / (1 - 0.999**n)

    assert w[0] == 1.0 and w[1] == pytest.approx(1.0)
    assert w[2] == pytest.approx(inv_effective(518) / inv_effective(2125))
    assert w[3] == pytest.approx(inv_effective(88) / inv_effective(2125))
    assert 1 < w[2] < w[3] < 2125 / 88  # between no weighting and inverse frequency
    cfg.loss.class_weights = {"mask_weared_incorrect": 4.0}  # explicit weights win
    assert cfg.class_weight_list(counts)[3] == 4.0
    off = _cfg(tmp_path)
    off.loss.class_weights = {}
    assert off.class_weight_list(counts) is None
    with pytest.raises(ConfigError, match="not both"):
        _cfg(tmp_path, **{"loss.class_balance_beta": 0.99, "loss.class_weight_exponent": 0.5})


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # a frozen layer stays bit-identical
    ema = ModelEma(model, decay=0.9, warmup_steps=10)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
    d = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.current_decay() == pytest.approx(d)
    ema.update(model)
    assert ema.updates == 1
    expect = before["0.weight"] * d + model[0].weight.detach() * (1 - d)
    assert torch.allclose(ema.module[0].weight, expect, atol=1e-6)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert torch.equal(ema.module[2].weight, model[2].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert ModelEma(model, 0.99, warmup_steps=0).current_decay() == 0.99


def test_default_ema_warm_up_ends_early_in_a_short_cpu_run():
    # a 50-epoch run of the CPU configs is ~1,900 optimiser steps: the average must be at its decay by a
    # quarter of them, not still warming up at the end (YOLOv5's 2000 would leave the decay at 0.6 x decay)
    from maskssd.training.config import TrainSection

    ema = ModelEma(torch.nn.Linear(2, 2), 0.999, warmup_steps=TrainSection().ema_warmup_steps)
    ema.updates = 1900 // 4
    assert ema.current_decay() > 0.9 * 0.999


# ----------------------------------------------------------------------------------------- schedules
def test_onecycle_rises_to_the_peak_then_anneals():
    cfg = ScheduleSection(name="onecycle", pct_start=0.25, min_lr_ratio=0.01, warmup_start_ratio=0.04)
    f = [lr_factor(cfg, 20, p / 10) for p in range(201)]
    assert f[0] == pytest.approx(0.04) and max(f) == pytest.approx(1.0) and f[50] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:50], f[1:51])) and all(a >= b for a, b in zip(f[50:], f[51:]))
    assert f[-1] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="onecycle"):
        validate({"data": {"root": "x"}, "schedule": {"name": "onecycle", "warmup_epochs": 1}})


def test_cosine_restarts_restart_at_each_period():
    cfg = ScheduleSection(name="cosine_restarts", restart_epochs=4, restart_mult=2, min_lr_ratio=0.1)
    assert [lr_factor(cfg, 30, e) for e in (0, 4, 12, 28)] == pytest.approx([1, 1, 1, 1])
    assert lr_factor(cfg, 30, 2) == pytest.approx(0.55) and lr_factor(cfg, 30, 8) == pytest.approx(0.55)
    assert lr_factor(cfg, 30, 4 - 1e-6) == pytest.approx(0.1, abs=1e-6)
    assert lr_factor(cfg, 30, 12 - 1e-6) == pytest.approx(0.1, abs=1e-6)
    same = ScheduleSection(name="cosine_restarts", restart_epochs=5, warmup_epochs=1)
    assert lr_factor(same, 30, 6) == pytest.approx(1.0) and lr_factor(same, 30, 11) == pytest.approx(1.0)
    assert lr_factor(same, 30, 0.5) < 0.51  # the linear warm-up still applies


# -------------------------------------------------------------------------------- progressive sizes
def test_size_schedule_steps_through_the_sizes():
    s = SizeSchedule((64, 80, 96), until=0.6, epochs=10)
    assert [s(e) for e in range(1, 11)] == [64, 64, 80, 80, 96, 96, 96, 96, 96, 96]
    assert s.describe() == "epochs 1-2 at 64 px, epochs 3-4 at 80 px, epochs 5-10 at 96 px"
    assert [SizeSchedule((64, 96), 1.0, 4)(e) for e in range(1, 5)] == [64, 64, 96, 96]


def test_priors_for_another_size_are_that_size_models_priors():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, input_size=96, width=8).train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    priors = {size: model.priors_for(size) for size in (64, 80)}
    assert [m.training for m in model.modules()] == modes  # probing the map sizes changes no mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # nor a BatchNorm statistic
    for size in (64, 80):
        assert torch.equal(
            priors[size], build_model("tiny", num_classes=4, input_size=size, width=8).priors_cxcy
        )
        locs, scores = model(torch.rand(2, 3, size, size))
        assert locs.shape[1] == scores.shape[1] == priors[size].shape[0] < model.priors_cxcy.shape[0]
    assert model.priors_for(64) is priors[64] and model.priors_for(96) is model.priors_cxcy
    with pytest.raises(MaskSSDError, match="300 px"):
        build_model("ssd300_vgg16", num_classes=4).priors_for(256)


def test_progressive_loader_gives_each_epoch_its_size(synth_root, tmp_path):
    cfg = _cfg(
        tmp_path, synth_root,
        **{"train.progressive_sizes": [64, 96], "train.progressive_until": 1.0, "train.epochs": 4},
    )  # fmt: skip
    ds = FaceMaskDataset(load_split(synth_root, "train", "default"), train_transform(96), cache_images=True)
    levers = configure_train_data(cfg, ds, 96)
    loader = build_loader(ds, 8, sampler=levers.sampler)
    seen = {}
    for epoch in (1, 2, 3, 4):
        loader.sampler.set_epoch(epoch)
        seen[epoch] = next(iter(loader)).images.shape[-1]
    assert seen == {1: 64, 2: 64, 3: 96, 4: 96}
    with pytest.raises(ConfigError, match="input_size"):
        _cfg(tmp_path, synth_root, **{"train.progressive_sizes": [64, 80]})


# ---------------------------------------------------------------------------------------- bf16 on CPU
def test_cpu_bf16_autocast_runs_convolutions_in_bfloat16():
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(torch.device("cpu"), enabled=True, cpu_bf16=False):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.float32  # train.amp alone: GPU only, as before
    with autocast(torch.device("cpu"), enabled=False, cpu_bf16=True):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16
    assert isinstance(cpu_supports_bf16(), bool)


# ------------------------------------------------------------------------------ all levers, one run
@pytest.mark.slow
def test_run_with_every_lever_resumes_exactly_and_evaluates_the_ema(tmp_path, synth_root, monkeypatch):
    from maskssd import tracking
    from maskssd.ssd.checkpoint import load
    from maskssd.tracking.experiment import run_experiment
    from maskssd.training import predict
    from tests.test_runner import histories

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_CHECKPOINT_DIR", raising=False)
    levers = {
        "data.repeat_factor_threshold": 0.5,
        "augment.copy_paste_p": 0.5,
        "loss.class_balance_beta": 0.99,
        "train.ema_decay": 0.9,
        "train.ema_warmup_steps": 4.0,
        "schedule.name": "cosine_restarts",
        "schedule.restart_epochs": 1.0,
        "train.progressive_sizes": [64, 96],
        "train.progressive_until": 0.5,
        "train.cpu_bf16": cpu_supports_bf16(),
    }
    cfg = load_config(write_tiny_experiment(tmp_path / "exp.toml", synth_root, epochs=2), levers)
    cfg.loss.class_weights = {}
    a = run_experiment(cfg, log_model=False)

    def stop_after_1(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, log_model=False, on_eval=[stop_after_1])
    c = tracking.client()
    b_id = [r.info.run_id for r in tracking.runs_table(c, "t") if r.info.run_id != a.run_id][0]
    run_experiment(cfg, resume_run_id=b_id, log_model=False)
    ha, hb = histories(c, a.run_id), histories(c, b_id)
    assert ha.keys() == hb.keys()
    for k in ha:
        assert [v for _, v in ha[k]] == pytest.approx([v for _, v in hb[k]], rel=1e-9, abs=1e-9), k
    params = c.get_run(a.run_id).data.params
    assert float(params["data.expected_images_per_epoch"]) > float(params["data.train_images"])
    assert int(params["augment.copy_paste_bank_faces"]) > 0
    weights = [float(x) for x in params["loss.effective_class_weights"].strip("[]").split(",")]
    assert weights[0] == 1.0 and weights[3] > weights[2] > weights[1] == 1.0

    # the checkpoint's model is the EMA, evaluated every epoch; the raw weights are kept beside it
    last = load(tmp_path / "mlruns" / "checkpoints" / a.run_id / "last.pt")
    assert last["ema_updates"] > 0 and last["epoch"] == 2
    differ = [
        k
        for k, v in last["model"].items()
        if v.is_floating_point() and not torch.equal(v, last["raw_model"][k])
    ]
    assert differ
    from maskssd.training.build import build_datasets, build_detector, build_loss

    model = build_detector(cfg)
    data = build_datasets(cfg, synth_root, model.input_size)
    loss_fn = build_loss(cfg, model, data["train"].class_box_counts())
    logged = {
        k: ha[k.replace("_", "/", 1)][-1][1] for k in ("val_loss", "val_map")
    }  # the last epoch's curves

    def val_of(weights):
        model.load_state_dict(weights)
        m, _ = predict.evaluate(
            model, build_loader(data["val"], 16), class_names=cfg.class_names, device=torch.device("cpu"),
            loss_fn=loss_fn, coco=False,
        )  # fmt: skip
        return {k: m[k] for k in logged}

    assert val_of(last["model"]) == pytest.approx(logged, rel=1e-9, abs=1e-9)
    assert val_of(last["raw_model"])["val_loss"] != pytest.approx(logged["val_loss"], rel=1e-6)
