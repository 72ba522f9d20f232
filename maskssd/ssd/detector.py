"""The common interface of maskssd detectors.

Every detector takes float images in [0, 1] of shape ``(N, 3, S, S)`` (it normalises internally, so exported
models need no preprocessing beyond resizing) and returns ``(locs (N, P, 4), scores (N, P, C))`` ordered like
its ``priors_cxcy`` buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from maskssd.errors import MaskSSDError
from maskssd.ssd.postprocess import DecodeSpec, Detections, postprocess
from maskssd.ssd.priors import PriorSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SSDDetector"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SSDDetector(nn.Module):
    """Common interface of maskssd detectors."""

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        prior_spec: PriorSpec,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.num_classes = num_classes
        self.input_size = input_size
        self.prior_spec = prior_spec
        self.build_args: dict[str, Any] = {}
        self.register_buffer("priors_cxcy", prior_spec.priors(), persistent=False)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def feature_map_sizes(self, input_size: int) -> tuple[int, ...]:
        """The side of each feature map at ``input_size`` (models with fixed default boxes refuse any other)."""
        if input_size == self.input_size:
            return tuple(self.prior_spec.feature_maps)
        raise MaskSSDError(
            f"{type(self).__name__} takes {self.input_size} px inputs only (fixed default boxes)"
        )

    def priors_for(self, input_size: int) -> torch.Tensor:
        """Default boxes ``(P, 4)`` for inputs of ``input_size``: the same scales and aspect ratios on the feature
        maps that size gives (progressive resizing); cached per size."""
        if input_size == self.input_size:
            return self.priors_cxcy
        cache = self.__dict__.setdefault("_priors_by_size", {})
        if input_size not in cache:
            spec = replace(self.prior_spec, feature_maps=self.feature_map_sizes(input_size))
            cache[input_size] = spec.priors()
        return cache[input_size].to(self.priors_cxcy.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    @torch.no_grad()
    def detect(
        self, images: torch.Tensor, spec: DecodeSpec = DecodeSpec(), sizes: torch.Tensor | None = None
    ) -> list[Detections]:
        """Forward + decode + NMS; boxes in original pixels when ``sizes`` (N, 2) (width, height) is given."""
        locs, scores = self(images)
        return postprocess(locs, scores, self.priors_cxcy, spec, sizes)
