"""The reference paper's code, transcribed: sgrvinod's a-PyTorch-Tutorial-to-Object-Detection, which the paper
trained and evaluated with.

Straightforward loops (per image, per class, per detection), kept as close to the tutorial as modern PyTorch
allows. maskssd never runs them: they are the tests' oracle (maskssd must give the same numbers) and the
benchmarks' baseline (timed in the same process). Departures from the tutorial are marked where they are made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------- utils.py


def create_prior_boxes() -> torch.Tensor:
    """``SSD300.create_prior_boxes``: the 8732 default boxes, ``(cx, cy, w, h)``, clipped to [0, 1]."""
    fmap_dims = {"conv4_3": 38, "conv7": 19, "conv8_2": 10, "conv9_2": 5, "conv10_2": 3, "conv11_2": 1}
    obj_scales = {
        "conv4_3": 0.1,
        "conv7": 0.2,
        "conv8_2": 0.375,
        "conv9_2": 0.55,
        "conv10_2": 0.725,
        "conv11_2": 0.9,
    }
    aspect_ratios = {
        "conv4_3": [1.0, 2.0, 0.5],
        "conv7": [1.0, 2.0, 3.0, 0.5, 0.333],
        "conv8_2": [1.0, 2.0, 3.0, 0.5, 0.333],
        "conv9_2": [1.0, 2.0, 3.0, 0.5, 0.333],
        "conv10_2": [1.0, 2.0, 0.5],
        "conv11_2": [1.0, 2.0, 0.5],
    }
    fmaps = list(fmap_dims.keys())
    prior_boxes = []
    for k, fmap in enumerate(fmaps):
        for i in range(fmap_dims[fmap]):
            for j in range(fmap_dims[fmap]):
                cx = (j + 0.5) / fmap_dims[fmap]
                cy = (i + 0.5) / fmap_dims[fmap]
                for ratio in aspect_ratios[fmap]:
                    prior_boxes.append(
                        [cx, cy, obj_scales[fmap] * math.sqrt(ratio), obj_scales[fmap] / math.sqrt(ratio)]
                    )
                    if ratio == 1.0:
                        try:
                            additional_scale = math.sqrt(obj_scales[fmap] * obj_scales[fmaps[k + 1]])
                        except IndexError:
                            additional_scale = 1.0
                        prior_boxes.append([cx, cy, additional_scale, additional_scale])
    return torch.FloatTensor(prior_boxes).clamp_(0, 1)


def find_jaccard_overlap(set_1: torch.Tensor, set_2: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``set_1 (n1, 4)`` with every box of ``set_2 (n2, 4)``, both xyxy."""
    lower = torch.max(set_1[:, :2].unsqueeze(1), set_2[:, :2].unsqueeze(0))
    upper = torch.min(set_1[:, 2:].unsqueeze(1), set_2[:, 2:].unsqueeze(0))
    dims = torch.clamp(upper - lower, min=0)
    intersection = dims[:, :, 0] * dims[:, :, 1]
    area_1 = (set_1[:, 2] - set_1[:, 0]) * (set_1[:, 3] - set_1[:, 1])
    area_2 = (set_2[:, 2] - set_2[:, 0]) * (set_2[:, 3] - set_2[:, 1])
    return intersection / (area_1.unsqueeze(1) + area_2.unsqueeze(0) - intersection)


def xy_to_cxcy(xy: torch.Tensor) -> torch.Tensor:
    return torch.cat([(xy[:, 2:] + xy[:, :2]) / 2, xy[:, 2:] - xy[:, :2]], 1)


def cxcy_to_xy(cxcy: torch.Tensor) -> torch.Tensor:
    return torch.cat([cxcy[:, :2] - (cxcy[:, 2:] / 2), cxcy[:, :2] + (cxcy[:, 2:] / 2)], 1)


def cxcy_to_gcxgcy(cxcy: torch.Tensor, priors_cxcy: torch.Tensor) -> torch.Tensor:
    """Encoding against priors, variances 0.1 and 0.2 (written as 10 and 5)."""
    return torch.cat(
        [
            (cxcy[:, :2] - priors_cxcy[:, :2]) / (priors_cxcy[:, 2:] / 10),
            torch.log(cxcy[:, 2:] / priors_cxcy[:, 2:]) * 5,
        ],
        1,
    )


def gcxgcy_to_cxcy(gcxgcy: torch.Tensor, priors_cxcy: torch.Tensor) -> torch.Tensor:
    """Decoding: the inverse of :func:`cxcy_to_gcxgcy`."""
    return torch.cat(
        [
            gcxgcy[:, :2] * priors_cxcy[:, 2:] / 10 + priors_cxcy[:, :2],
            torch.exp(gcxgcy[:, 2:] / 5) * priors_cxcy[:, 2:],
        ],
        1,
    )


# -------------------------------------------------------------------------------------------- model.py
ConfFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scores (K, C), targets (K,)) -> (K,)


class MultiBoxLoss(nn.Module):
    """The tutorial's ``MultiBoxLoss``: matching and hard-negative mining one image at a time.

    Departures: an image without objects is all background (the tutorial cannot match it); ``loc_loss=
    "smooth_l1"`` (the SSD paper: summed over offsets, divided by the positives) besides the tutorial's L1
    (``nn.L1Loss``, a mean); ``conf_fn`` may replace its ``CrossEntropyLoss(reduction="none")``.
    """

    def __init__(
        self,
        priors_cxcy: torch.Tensor,
        threshold: float = 0.5,
        neg_pos_ratio: float = 3,
        alpha: float = 1.0,
        loc_loss: str = "l1",
        conf_fn: ConfFn | None = None,
    ):
        super().__init__()
        self.priors_cxcy = priors_cxcy
        self.priors_xy = cxcy_to_xy(priors_cxcy)
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.loc_loss = loc_loss
        self.cross_entropy = conf_fn or nn.CrossEntropyLoss(reduction="none")

    def match(
        self, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """True classes ``(N, P)`` and encoded true locations ``(N, P, 4)``."""
        batch_size, n_priors = len(boxes), self.priors_cxcy.size(0)
        true_locs = torch.zeros((batch_size, n_priors, 4), dtype=torch.float)
        true_classes = torch.zeros((batch_size, n_priors), dtype=torch.long)
        for i in range(batch_size):
            n_objects = boxes[i].size(0)
            if n_objects == 0:  # departure: all background
                continue
            overlap = find_jaccard_overlap(boxes[i], self.priors_xy)
            overlap_for_each_prior, object_for_each_prior = overlap.max(dim=0)
            _, prior_for_each_object = overlap.max(dim=1)
            object_for_each_prior[prior_for_each_object] = torch.LongTensor(range(n_objects))
            overlap_for_each_prior[prior_for_each_object] = 1.0
            label_for_each_prior = labels[i][object_for_each_prior]
            label_for_each_prior[overlap_for_each_prior < self.threshold] = 0
            true_classes[i] = label_for_each_prior
            true_locs[i] = cxcy_to_gcxgcy(xy_to_cxcy(boxes[i][object_for_each_prior]), self.priors_cxcy)
        return true_classes, true_locs

    def terms(
        self,
        predicted_locs: torch.Tensor,
        predicted_scores: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(total, conf, loc, n_positives)``."""
        batch_size, n_priors, n_classes = predicted_scores.shape
        true_classes, true_locs = self.match(boxes, labels)
        positive_priors = true_classes != 0
        if self.loc_loss == "l1":
            loc_loss = nn.L1Loss()(predicted_locs[positive_priors], true_locs[positive_priors])
        else:
            loc_loss = (
                nn.SmoothL1Loss(reduction="sum")(predicted_locs[positive_priors], true_locs[positive_priors])
                / positive_priors.sum().float()
            )
        n_positives = positive_priors.sum(dim=1)
        n_hard_negatives = self.neg_pos_ratio * n_positives
        conf_loss_all = self.cross_entropy(predicted_scores.view(-1, n_classes), true_classes.view(-1))
        conf_loss_all = conf_loss_all.view(batch_size, n_priors)
        conf_loss_pos = conf_loss_all[positive_priors]
        conf_loss_neg = conf_loss_all.clone()
        conf_loss_neg[positive_priors] = 0.0
        conf_loss_neg, _ = conf_loss_neg.sort(dim=1, descending=True)
        hardness_ranks = torch.LongTensor(range(n_priors)).unsqueeze(0).expand_as(conf_loss_neg)
        hard_negatives = hardness_ranks < n_hard_negatives.unsqueeze(1)
        conf_loss_hard_neg = conf_loss_neg[hard_negatives]
        conf_loss = (conf_loss_hard_neg.sum() + conf_loss_pos.sum()) / n_positives.sum().float()
        return conf_loss + self.alpha * loc_loss, conf_loss, loc_loss, int(n_positives.sum())

    def forward(
        self,
        predicted_locs: torch.Tensor,
        predicted_scores: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        return self.terms(predicted_locs, predicted_scores, boxes, labels)[0]


def detect_objects(
    predicted_locs: torch.Tensor,
    predicted_scores: torch.Tensor,
    priors_cxcy: torch.Tensor,
    min_score: float = 0.01,
    max_overlap: float = 0.45,
    top_k: int = 200,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``SSD300.detect_objects``: per image, per class, a greedy suppression loop in Python.

    Departures: decoded boxes are clamped to [0, 1] (as maskssd does), and the uint8 masks are bool masks
    (which modern PyTorch requires). Returns per-image boxes (normalised xyxy), labels and scores.
    """
    batch_size, n_classes = predicted_locs.size(0), predicted_scores.size(2)
    predicted_scores = F.softmax(predicted_scores, dim=2)
    all_boxes, all_labels, all_scores = [], [], []
    for i in range(batch_size):
        decoded_locs = cxcy_to_xy(gcxgcy_to_cxcy(predicted_locs[i], priors_cxcy)).clamp(0, 1)
        image_boxes, image_labels, image_scores = [], [], []
        for c in range(1, n_classes):
            class_scores = predicted_scores[i][:, c]
            score_above_min_score = class_scores > min_score
            n_above_min_score = score_above_min_score.sum().item()
            if n_above_min_score == 0:
                continue
            class_scores = class_scores[score_above_min_score]
            class_decoded_locs = decoded_locs[score_above_min_score]
            class_scores, sort_ind = class_scores.sort(dim=0, descending=True)
            class_decoded_locs = class_decoded_locs[sort_ind]
            overlap = find_jaccard_overlap(class_decoded_locs, class_decoded_locs)
            suppress = torch.zeros(n_above_min_score, dtype=torch.bool)
            for box in range(class_decoded_locs.size(0)):
                if suppress[box]:
                    continue
                suppress = suppress | (overlap[box] > max_overlap)
                suppress[box] = False
            image_boxes.append(class_decoded_locs[~suppress])
            image_labels.append(torch.LongTensor(int((~suppress).sum().item()) * [c]))
            image_scores.append(class_scores[~suppress])
        if len(image_boxes) == 0:
            image_boxes.append(torch.FloatTensor([[0.0, 0.0, 1.0, 1.0]]))
            image_labels.append(torch.LongTensor([0]))
            image_scores.append(torch.FloatTensor([0.0]))
        image_boxes = torch.cat(image_boxes, dim=0)
        image_labels = torch.cat(image_labels, dim=0)
        image_scores = torch.cat(image_scores, dim=0)
        if image_scores.size(0) > top_k:
            image_scores, sort_ind = image_scores.sort(dim=0, descending=True)
            image_scores = image_scores[:top_k]
            image_boxes = image_boxes[sort_ind][:top_k]
            image_labels = image_labels[sort_ind][:top_k]
        all_boxes.append(image_boxes)
        all_labels.append(image_labels)
        all_scores.append(image_scores)
    return all_boxes, all_labels, all_scores


# --------------------------------------------------------------------------------------------- utils.py
def calculate_map(
    det_boxes: Sequence[torch.Tensor],
    det_labels: Sequence[torch.Tensor],
    det_scores: Sequence[torch.Tensor],
    true_boxes: Sequence[torch.Tensor],
    true_labels: Sequence[torch.Tensor],
    true_difficulties: Sequence[torch.Tensor],
    n_classes: int,
    method: str = "voc07",
    threshold: float = 0.5,
) -> list[float]:
    """``calculate_mAP``: per-class AP, one detection at a time (float32); classes are ``1..n_classes``.

    Departures: a stable score sort; a class without non-difficult objects gets nan (and is left out of a
    mean); ``method="voc12"`` swaps in the VOC2010+ devkit's all-point AP for the 11-point one.
    """
    true_images = torch.LongTensor([i for i, lab in enumerate(true_labels) for _ in range(lab.size(0))])
    true_boxes, true_labels = torch.cat(list(true_boxes), dim=0), torch.cat(list(true_labels), dim=0)
    true_difficulties = torch.cat(list(true_difficulties), dim=0).to(torch.uint8)
    det_images = torch.LongTensor([i for i, lab in enumerate(det_labels) for _ in range(lab.size(0))])
    det_boxes, det_labels = torch.cat(list(det_boxes), dim=0), torch.cat(list(det_labels), dim=0)
    det_scores = torch.cat(list(det_scores), dim=0)

    average_precisions = torch.zeros(n_classes, dtype=torch.float)
    for c in range(1, n_classes + 1):
        true_class_images = true_images[true_labels == c]
        true_class_boxes = true_boxes[true_labels == c]
        true_class_difficulties = true_difficulties[true_labels == c]
        n_easy_class_objects = (1 - true_class_difficulties).sum().item()
        if n_easy_class_objects == 0:
            average_precisions[c - 1] = math.nan
            continue
        true_class_boxes_detected = torch.zeros(true_class_difficulties.size(0), dtype=torch.uint8)

        det_class_images = det_images[det_labels == c]
        det_class_boxes = det_boxes[det_labels == c]
        det_class_scores = det_scores[det_labels == c]
        n_class_detections = det_class_boxes.size(0)
        if n_class_detections == 0:
            continue
        det_class_scores, sort_ind = torch.sort(det_class_scores, dim=0, descending=True, stable=True)
        det_class_images = det_class_images[sort_ind]
        det_class_boxes = det_class_boxes[sort_ind]

        true_positives = torch.zeros(n_class_detections, dtype=torch.float)
        false_positives = torch.zeros(n_class_detections, dtype=torch.float)
        for d in range(n_class_detections):
            this_detection_box = det_class_boxes[d].unsqueeze(0)
            this_image = det_class_images[d]
            object_boxes = true_class_boxes[true_class_images == this_image]
            object_difficulties = true_class_difficulties[true_class_images == this_image]
            if object_boxes.size(0) == 0:
                false_positives[d] = 1
                continue
            overlaps = find_jaccard_overlap(this_detection_box, object_boxes)
            max_overlap, ind = torch.max(overlaps.squeeze(0), dim=0)
            original_ind = torch.LongTensor(range(true_class_boxes.size(0)))[true_class_images == this_image][
                ind
            ]
            if max_overlap.item() > threshold:
                if object_difficulties[ind] == 0:
                    if true_class_boxes_detected[original_ind] == 0:
                        true_positives[d] = 1
                        true_class_boxes_detected[original_ind] = 1
                    else:
                        false_positives[d] = 1
            else:
                false_positives[d] = 1

        cumul_true_positives = torch.cumsum(true_positives, dim=0)
        cumul_false_positives = torch.cumsum(false_positives, dim=0)
        cumul_precision = cumul_true_positives / (cumul_true_positives + cumul_false_positives + 1e-10)
        cumul_recall = cumul_true_positives / n_easy_class_objects

        if method == "voc07":
            recall_thresholds = torch.arange(start=0, end=1.1, step=0.1).tolist()
            precisions = torch.zeros(len(recall_thresholds), dtype=torch.float)
            for i, th in enumerate(recall_thresholds):
                recalls_above_t = cumul_recall >= th
                if recalls_above_t.any():
                    precisions[i] = cumul_precision[recalls_above_t].max()
                else:
                    precisions[i] = 0.0
            average_precisions[c - 1] = precisions.mean()
        else:  # departure: the VOC2010+ devkit's voc_ap
            mrec = [0.0, *cumul_recall.tolist(), 1.0]
            mpre = [0.0, *cumul_precision.tolist(), 0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            average_precisions[c - 1] = sum(
                (mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]
            )
    return average_precisions.tolist()
