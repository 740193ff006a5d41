"""The protocol every backbone family implements.

A backbone owns its preprocessing (resize policy, normalisation), returns dense
features ``[B, C, h, w]`` from a chosen block, and reports, per image, the
`CellTransform` from original pixels to its feature cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semcorr.pipeline.coords import CellTransform

RESIZE_POLICIES = ("pad", "squash")

default_spec = {
    "family": "dinov2",  # dinov2 | dinov3 | sam | clip | daisy
    "variant": "vitb14",  # family-specific model name, e.g. vitb14_reg4, vit_b, ViT-B-16
    "weights": None,  # path to the official checkpoint file (or a tuned one)
    "sha256": None,  # expected sha256 of `weights`; checked before loading
    "random_init": False,  # allowed only when True; marked in every output
    "layer": None,  # blocks to run (1..depth); None = all, then the final norm
    "input_size": 518,  # side S of the square network input
    "resize": "pad",  # pad: keep aspect, pad right/bottom to S x S; squash: resize to S x S
    "arch": {},  # architecture overrides (depth, embed_dim, ...) for tiny test/demo models
}


@dataclass(frozen=True)
class BackboneSpec:
    family: str
    variant: str
    weights: str | None = None
    sha256: str | None = None
    random_init: bool = False
    layer: int | None = None
    input_size: int = 518
    resize: str = "pad"
    arch: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.weights is None and not self.random_init and self.family != "daisy":
            raise ValueError(
                f"backbone {self.family}/{self.variant} has no weights path; set its `weights` "
                "param to the checkpoint file, or `random_init: true` to run untrained on purpose"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class Backbone(nn.Module):
    """Dense feature extractor. Subclasses set ``patch_size``, ``feat_dim``,
    ``mean``/``std`` and implement `forward` (and, for ViTs, the block split used
    by fine-tuning: `blocks`, `forward_prefix`, `forward_tail`)."""

    patch_size: int
    feat_dim: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec

    # -- preprocessing ------------------------------------------------------------
    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Size the original image is resized to inside the ``S x S`` input."""
        s = self.spec.input_size
        if self.spec.resize == "squash":
            return s, s
        h, w = image_hw
        scale = s / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature cells kept for an image: those that hold image, not padding."""
        rh, rw = self.resized_hw(image_hw)
        p = self.patch_size
        return math.ceil(rh / p), math.ceil(rw / p)

    def transform(self, image_hw: tuple[int, int]) -> CellTransform:
        return CellTransform.from_resize(image_hw, self.resized_hw(image_hw), (0.0, 0.0), self.patch_size, self.grid_hw(image_hw))

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, CellTransform]:
        """``image: [H, W, 3]`` uint8 RGB -> (``[3, S, S]`` float32 normalised input, transform)."""
        h, w = image.shape[:2]
        rh, rw = self.resized_hw((h, w))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        x = (x - mean) / std
        s = self.spec.input_size
        x = F.pad(x, (0, s - rw, 0, s - rh))  # zeros = the mean colour after normalisation
        return x, self.transform((h, w))

    # -- features -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 3, S, S]`` -> ``[B, C, S/p, S/p]``."""
        raise NotImplementedError

    # -- fine-tuning split (transformer families) ---------------------------------
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order; fine-tuning unfreezes the last N."""
        raise NotImplementedError(f"{type(self).__name__} has no transformer blocks to fine-tune")

    def forward_prefix(self, x: torch.Tensor, n_tail: int) -> torch.Tensor:
        """``x: [B, 3, S, S]`` -> the tokens entering block ``L - n_tail`` (family layout)."""
        raise NotImplementedError

    def forward_tail(self, tokens: torch.Tensor, n_tail: int) -> torch.Tensor:
        """Tokens from `forward_prefix` -> ``[B, C, S/p, S/p]``; equals `forward` on the same input."""
        raise NotImplementedError
