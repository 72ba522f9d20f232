"""End to end in seconds: the tiny SSD learns a small synthetic face-mask dataset (loss falls, val mAP rises)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskssd.data import DEFAULT_CLASSES, FaceMaskDataset, load_split
from maskssd.data.synth import generate
from maskssd.data.transforms import AugmentSpec, eval_transform, train_transform
from maskssd.ssd.loss import MultiBoxLoss
from maskssd.ssd.models import build_model
from maskssd.ssd.postprocess import DecodeSpec
from maskssd.training.build import build_loader
from maskssd.training.predict import evaluate

SIZE = 128
EPOCHS = 12


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = generate(
        tmp_path_factory.mktemp("learn") / "s",
        n_images=40,
        seed=0,
        face_size=(0.2, 0.45),
        faces_per_image=(1, 3),
        class_probs=(0.5, 0.3, 0.2),
    )
    return summary.root


def loaders(root: Path):
    def dataset(split: str, transform) -> FaceMaskDataset:
        anns = load_split(root, split, "default", DEFAULT_CLASSES)
        assert anns
        return FaceMaskDataset(anns, transform, DEFAULT_CLASSES, cache_images=True)

    # light augmentation only: a handful of epochs must be enough
    aug = AugmentSpec(photometric_p=0.0, zoom_out_p=0.0, iou_crop_p=0.0, hflip_p=0.5)
    train = build_loader(dataset("train", train_transform(SIZE, aug)), 8, 0, seed=0, shuffle=True)
    seen = build_loader(dataset("train", eval_transform(SIZE)), 16, 0, seed=0, shuffle=False)
    val = build_loader(dataset("val", eval_transform(SIZE)), 16, 0, seed=0, shuffle=False)
    return train, seen, val


@pytest.mark.slow
def test_tiny_model_learns_synthetic_faces(synth):
    torch.manual_seed(0)
    train, seen, val = loaders(synth)
    model = build_model("tiny", num_classes=len(DEFAULT_CLASSES) + 1, input_size=SIZE)
    loss_fn = MultiBoxLoss(model.priors_cxcy, neg_pos_ratio=3.0, alpha=1.0)
    decode = DecodeSpec()  # the paper protocol: min_score 0.01, NMS 0.45, top 200
    device = torch.device("cpu")

    before, _ = evaluate(
        model, val, loss_fn=loss_fn, class_names=DEFAULT_CLASSES, device=device, decode=decode, coco=False
    )
    seen_before, _ = evaluate(
        model, seen, loss_fn=loss_fn, class_names=DEFAULT_CLASSES, device=device, decode=decode, coco=False
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epoch_losses = []
    for epoch in range(EPOCHS):
        model.train()
        train.sampler.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in train:
            locs, scores = model(batch.images)
            out = loss_fn(locs, scores, batch.boxes, batch.labels)
            assert torch.isfinite(out.total)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            total += out.total.item()
            n += 1
        epoch_losses.append(total / n)

    after, result = evaluate(
        model, val, loss_fn=loss_fn, class_names=DEFAULT_CLASSES, device=device, decode=decode, coco=False
    )
    seen_after, _ = evaluate(
        model, seen, loss_fn=loss_fn, class_names=DEFAULT_CLASSES, device=device, decode=decode, coco=False
    )
    msg = (
        f"train loss per epoch {[round(x, 3) for x in epoch_losses]}; val before {before}, after {after}; "
        f"training images before {seen_before}, after {seen_after}"
    )
    assert epoch_losses[-1] < 0.6 * epoch_losses[0], msg
    # the training images (29, without augmentation) are learnt: mAP ~0.8 whatever the seed; the 6 validation
    # images are too few for a tight bound (0.09-0.42 over seeds 0-3 at these settings), but mAP must rise
    assert seen_after["val_map"] > seen_before["val_map"] + 0.5, msg
    assert after["val_loss"] < before["val_loss"], msg
    assert after["val_map"] > before["val_map"] + 0.05, msg
    assert 0.0 <= result.map <= 1.0
