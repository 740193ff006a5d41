"""DAISY (Tola et al.) dense descriptors via ``skimage.feature.daisy``: a weight-free
classical baseline and the offline demo's backbone, following the same protocol.

Descriptors are sampled exactly at the feature-cell centres of pipeline.coords:
cell (i, j) of a patch-p grid has its centre at input pixel ``((p-1)/2 + j*p, (p-1)/2 + i*p)``,
which is a pixel only for odd p, so p must be odd.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import daisy

from semcorr.pipeline.backbones.base import Backbone, BackboneSpec
from semcorr.pipeline.backbones.vit import finish

default_conf = {
    "patch": 7,  # cell side p in input pixels (odd: cell centres must be pixels)
    "radius": 15,  # radius of the outermost ring of histograms, input pixels
    "rings": 3,  # rings of histograms around the centre
    "histograms": 8,  # histograms per ring
    "orientations": 8,  # orientation bins per histogram
}
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey from RGB


class DaisyBackbone(Backbone):
    mean = (0.0, 0.0, 0.0)  # inputs stay in [0, 1]; padding is black
    std = (1.0, 1.0, 1.0)

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        unknown = set(spec.arch) - set(default_conf)
        if unknown:
            raise ValueError(f"unknown daisy arch keys {sorted(unknown)}; known: {sorted(default_conf)}")
        self.conf = {**default_conf, **spec.arch}
        p, radius = self.conf["patch"], self.conf["radius"]
        if p % 2 == 0:
            raise ValueError(f"daisy patch must be odd so descriptors sit on cell centres, got {p}")
        if radius < (p - 1) // 2:
            raise ValueError(f"daisy radius {radius} must be at least (patch - 1) / 2 = {(p - 1) // 2}")
        if spec.input_size % p:
            raise ValueError(f"daisy input_size {spec.input_size} is not a multiple of its patch {p}")
        self.patch_size = p
        self.feat_dim = (self.conf["rings"] * self.conf["histograms"] + 1) * self.conf["orientations"]
        self.num_blocks = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 3, H, W]`` in [0, 1] -> ``[B, C, H/p, W/p]`` L2-normalised descriptors."""
        luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        grey = (x * luma).sum(1).detach().cpu().float().numpy()
        feats = torch.from_numpy(np.stack([self._describe(g) for g in grey])).permute(0, 3, 1, 2)
        return F.normalize(feats, dim=1).to(x.device)

    def _describe(self, grey: np.ndarray) -> np.ndarray:
        """``grey: [H, W]`` -> ``[H/p, W/p, C]`` unnormalised descriptors at the cell centres."""
        p, radius = self.patch_size, self.conf["radius"]
        # daisy samples rows/cols radius + k * p of its input; shift so that they land
        # on the cell centres (p - 1) / 2 + k * p of the image.
        margin = radius - (p - 1) // 2
        padded = np.pad(grey, margin, mode="reflect")
        desc = daisy(
            padded,
            step=p,
            radius=radius,
            rings=self.conf["rings"],
            histograms=self.conf["histograms"],
            orientations=self.conf["orientations"],
            normalization="off",
        )
        h, w = grey.shape[0] // p, grey.shape[1] // p
        return desc[:h, :w]


def build(spec: BackboneSpec) -> DaisyBackbone:
    if spec.weights is not None:
        raise ValueError(f"daisy is weight-free; got weights {spec.weights}")
    return finish(DaisyBackbone(spec))
