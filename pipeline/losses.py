"""Gaussian cross-entropy for fine-tuning dense features on keypoint pairs.

For each source keypoint: sample its descriptor bilinearly at its cell coordinates,
take the cosine similarity with every cell of the target map, softmax with a
temperature, and compare with a truncated Gaussian centred on the cell the matcher
maps the ground-truth target keypoint to (`CellTransform.nearest_cell`). All
pixel <-> cell conversions go through `pipeline.coords`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import CellTransform, inside_cells, sample_cells

default_conf = {
    "temperature": 0.03,  # softmax temperature on cosine similarities
    "kernel_size": 7,  # side of the (odd) square Gaussian support, in cells
    "sigma": 1.5,  # Gaussian standard deviation, in cells
}


@dataclass
class KeypointTargets:
    """Per-pair training targets in feature-cell coordinates.

    src_cells: [N, 2] continuous (gx, gy) of the source keypoints on the source grid;
    trg_peak: [N, 2] integer (j, i) target cell = ``trg_transform.nearest_cell(trg_xy)``;
    valid: [N] keypoints visible in both images whose points lie on both grids.
    """

    src_cells: torch.Tensor
    trg_peak: torch.Tensor
    valid: torch.Tensor


def keypoint_targets(
    src_xy: np.ndarray,
    trg_xy: np.ndarray,
    visible: np.ndarray,
    src_transform: CellTransform,
    trg_transform: CellTransform,
) -> KeypointTargets:
    """``src_xy, trg_xy: [N, 2]`` original pixels, ``visible: [N]`` -> `KeypointTargets`.

    Invisible keypoints and those off either feature grid are masked; their coordinates
    are replaced by 0 so that no NaN reaches the loss.
    """
    src_xy = np.nan_to_num(np.asarray(src_xy, dtype=np.float64).reshape(-1, 2))
    trg_xy = np.nan_to_num(np.asarray(trg_xy, dtype=np.float64).reshape(-1, 2))
    src_cells = src_transform.pixels_to_cells(src_xy)
    trg_cells = trg_transform.pixels_to_cells(trg_xy)
    valid = (
        np.asarray(visible, dtype=bool)
        & inside_cells(src_cells, src_transform.grid_h, src_transform.grid_w)
        & inside_cells(trg_cells, trg_transform.grid_h, trg_transform.grid_w)
    )
    src_cells = np.where(valid[:, None], src_cells, 0.0)
    trg_peak = np.where(valid[:, None], trg_transform.nearest_cell(trg_xy), 0)
    return KeypointTargets(
        src_cells=torch.from_numpy(src_cells).float(),
        trg_peak=torch.from_numpy(trg_peak).long(),
        valid=torch.from_numpy(valid),
    )


def gaussian_target(peak: torch.Tensor, grid_hw: tuple[int, int], kernel_size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Truncated Gaussian probability maps.

    peak: [N, 2] integer (j, i) centre cells -> [N, h, w], each map summing to 1: a
    ``kernel_size x kernel_size`` Gaussian of std ``sigma`` cells, cut at the grid
    border and renormalised.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    h, w = grid_hw
    radius = kernel_size // 2
    peak = peak.to(torch.long)
    dj = torch.arange(w, device=peak.device)[None, None, :] - peak[:, 0, None, None]
    di = torch.arange(h, device=peak.device)[None, :, None] - peak[:, 1, None, None]
    support = (dj.abs() <= radius) & (di.abs() <= radius)
    weights = torch.exp(-(dj**2 + di**2).float() / (2.0 * sigma**2)) * support
    return weights / weights.sum(dim=(1, 2), keepdim=True)


def gaussian_cross_entropy(
    src_desc: torch.Tensor,
    trg_feats: torch.Tensor,
    trg_peak: torch.Tensor,
    temperature: float = 0.03,
    kernel_size: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-keypoint loss.

    src_desc: [N, C] source descriptors; trg_feats: [C, h, w] target map (only image
    cells); trg_peak: [N, 2] integer (j, i) -> [N] cross-entropy between the softmax of
    cosine similarities / temperature over the h*w cells and the Gaussian target.
    """
    c, h, w = trg_feats.shape
    src = F.normalize(src_desc.float(), dim=-1)
    trg = F.normalize(trg_feats.float().reshape(c, h * w), dim=0)
    log_prob = F.log_softmax(src @ trg / temperature, dim=-1)
    target = gaussian_target(trg_peak, (h, w), kernel_size, sigma).reshape(-1, h * w)
    return -(target * log_prob).sum(dim=-1)


def batch_loss(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    targets: list[KeypointTargets],
    src_grids: list[tuple[int, int]],
    trg_grids: list[tuple[int, int]],
    conf: dict | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean Gaussian cross-entropy over the valid keypoints of a batch of pairs.

    src_feats, trg_feats: [B, C, H, W] network outputs (padding included); each map is
    cropped to its image cells ``grid_hw`` first, as the feature store does, so training
    sees the grids that matching sees. Returns (mean loss, number of valid keypoints);
    a batch without any valid keypoint gives a zero loss that still depends on the
    parameters.
    """
    conf = {**default_conf, **(conf or {})}
    total = src_feats.new_zeros((), dtype=torch.float32)
    count = 0
    for b, tgt in enumerate(targets):
        valid = tgt.valid.to(src_feats.device)
        if not bool(valid.any()):
            continue
        (sh, sw), (th, tw) = src_grids[b], trg_grids[b]
        src_map = src_feats[b : b + 1, :, :sh, :sw]
        cells = tgt.src_cells.to(src_feats.device)[valid]
        src_desc = sample_cells(src_map.float(), cells[None])[0]
        losses = gaussian_cross_entropy(
            src_desc,
            trg_feats[b, :, :th, :tw],
            tgt.trg_peak.to(src_feats.device)[valid],
            conf["temperature"],
            conf["kernel_size"],
            conf["sigma"],
        )
        total = total + losses.sum()
        count += int(valid.sum())
    if count == 0:
        return (src_feats.sum() + trg_feats.sum()).float() * 0.0, 0
    return total / count, count
