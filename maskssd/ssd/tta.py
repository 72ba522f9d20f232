"""Horizontal-flip test-time augmentation for SSD: predict on the image and its mirror, merge before NMS.

An SSD's default boxes lie on grids that are symmetric about the vertical axis: the prior at (map ``k``, row
``i``, column ``j``, box ``b``) mirrors to the prior at (``k``, ``i``, ``f_k - 1 - j``, ``b``), whose centre is
``1 - cx`` and whose size is the same. So what the model predicts at prior ``p`` of the flipped image is a
prediction for the mirrored prior ``p'`` of the original, with the x offset negated (the other offsets and the
class scores unchanged). :func:`merge_hflip` puts those predictions in the original prior order and appends
them to the plain ones along the prior axis; :func:`maskssd.ssd.postprocess.postprocess` then scores, decodes
and suppresses both sets at once against the priors taken twice (:func:`tta_priors`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskssd.ssd.priors import PriorSpec

__all__ = [
    "hflip_forward",
    "hflip_predictions",
    "merge_hflip",
    "mirror_error",
    "mirror_permutation",
    "tta_priors",
]

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mirror_permutation(spec: PriorSpec) -> torch.Tensor:
    """``perm (P,)`` with ``perm[p]`` the prior that mirrors prior ``p`` (an involution: ``perm[perm]`` is the
    identity), from the layout of :meth:`PriorSpec.priors`: map, then row, column and box."""
    parts, offset = [], 0
    for fmap, boxes in zip(spec.feature_maps, spec.boxes_per_location):
        idx = torch.arange(fmap * fmap * boxes).view(fmap, fmap, boxes)
        parts.append(idx.flip(1).reshape(-1) + offset)  # column j <- column fmap - 1 - j
        offset += fmap * fmap * boxes
    return torch.cat(parts)


def mirror_error(priors_cxcy: torch.Tensor, perm: torch.Tensor) -> float:
    """Largest difference between the priors mirrored (``cx -> 1 - cx``) and the priors ``perm`` points at: 0 up
    to float rounding when ``perm`` is the mirror permutation of these priors."""
    mirrored = priors_cxcy.clone()
    mirrored[:, 0] = 1.0 - mirrored[:, 0]
    return float((mirrored - priors_cxcy[perm]).abs().max())


def hflip_predictions(
    locs: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions on a mirrored image ``(N, P, 4)``, ``(N, P, C)`` -> the same predictions for the original
    image, in its prior order: row ``p`` comes from row ``perm[p]``, its x offset negated."""
    perm = perm.to(locs.device)
    locs = locs.index_select(1, perm)
    locs[..., 0].neg_()
    return locs, scores.index_select(1, perm.to(scores.device))


def merge_hflip(
    locs: torch.Tensor,
    scores: torch.Tensor,
    flipped_locs: torch.Tensor,
    flipped_scores: torch.Tensor,
    perm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain predictions and the mirrored image's predictions -> ``(N, 2P, 4)``, ``(N, 2P, C)``: the plain ones,
    then the mirrored ones mapped back (:func:`hflip_predictions`). Decode them against :func:`tta_priors`."""
    back_locs, back_scores = hflip_predictions(flipped_locs, flipped_scores, perm)
    return torch.cat([locs, back_locs], 1), torch.cat([scores, back_scores], 1)


def tta_priors(priors_cxcy: torch.Tensor) -> torch.Tensor:
    """The priors of merged predictions: ``(2P, 4)``, the priors twice."""
    return torch.cat([priors_cxcy, priors_cxcy], 0)


def hflip_forward(
    forward: Forward, images: torch.Tensor, perm: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``forward`` on the images, then on their mirrors: two calls, not one batch of ``2N`` (on CPU a batch of
    two 384 px images took 1.35x as long as two single-image calls in PyTorch, 1.1x in ONNX Runtime).

    Returns the plain predictions ``(locs, scores)`` (for a loss) and the merged ones (for post-processing
    against :func:`tta_priors`).
    """
    locs, scores = forward(images)
    flipped_locs, flipped_scores = forward(images.flip(-1))
    return (locs, scores), merge_hflip(locs, scores, flipped_locs, flipped_scores, perm)
