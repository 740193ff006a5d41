"""Gaussian cross-entropy: targets, masking, and the one coordinate convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import CellTransform
from semcorr.pipeline.losses import batch_loss, gaussian_cross_entropy, gaussian_target, keypoint_targets
from semcorr.pipeline.matching import match_keypoints


def transform(image_hw, input_size, patch, resize):
    """The CellTransform a backbone with this resize policy reports (see base.Backbone)."""
    h, w = image_hw
    if resize == "squash":
        rh, rw = input_size, input_size
    else:
        scale = input_size / max(h, w)
        rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    return CellTransform.from_resize(image_hw, (rh, rw), (0.0, 0.0), patch, (math.ceil(rh / patch), math.ceil(rw / patch)))


def test_gaussian_target_is_normalised_and_centred():
    peak = torch.tensor([[5, 4]])
    target = gaussian_target(peak, (9, 11), kernel_size=7, sigma=1.5)[0]
    assert target.shape == (9, 11)
    assert torch.isclose(target.sum(), torch.tensor(1.0))
    assert tuple(int(v) for v in np.unravel_index(int(target.argmax()), target.shape)) == (4, 5)  # (i, j)
    # 7x7 support, Gaussian weights relative to the peak
    assert int((target > 0).sum()) == 49
    assert torch.isclose(target[4, 6] / target[4, 5], torch.tensor(math.exp(-1 / (2 * 1.5**2))))
    assert torch.isclose(target[5, 6] / target[4, 5], torch.tensor(math.exp(-2 / (2 * 1.5**2))))
    assert target[4, 9] == 0 and target[0, 5] == 0  # beyond the kernel radius 3


def test_gaussian_target_truncated_at_border_and_renormalised():
    corner = gaussian_target(torch.tensor([[0, 0]]), (6, 6), kernel_size=7, sigma=1.5)[0]
    assert int((corner > 0).sum()) == 16  # radius 3 inside the grid: 4 x 4 cells
    assert torch.isclose(corner.sum(), torch.tensor(1.0))
    full = gaussian_target(torch.tensor([[3, 3]]), (7, 7), kernel_size=7, sigma=1.5)[0]
    # same shape as the full kernel's quadrant, scaled up by the renormalisation
    quadrant = full[3:, 3:]
    assert torch.allclose(corner[:4, :4] / corner[0, 0], quadrant / quadrant[0, 0])
    assert corner[0, 0] > full[3, 3]


def test_gaussian_target_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        gaussian_target(torch.tensor([[0, 0]]), (4, 4), kernel_size=4)


def test_cross_entropy_matches_torch_soft_label_cross_entropy():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(5, 8, generator=g)
    trg = torch.randn(8, 6, 7, generator=g)
    peak = torch.tensor([[0, 0], [6, 5], [3, 2], [1, 4], [6, 0]])
    ours = gaussian_cross_entropy(src, trg, peak, temperature=0.05, kernel_size=5, sigma=1.0)
    logits = F.cosine_similarity(src[:, :, None], trg.reshape(8, -1)[None], dim=1) / 0.05
    labels = gaussian_target(peak, (6, 7), 5, 1.0).reshape(5, -1)
    reference = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(ours, reference, atol=1e-4)


def test_loss_is_small_when_features_match_and_large_when_not():
    # target cells carry distinct one-hot features; the source descriptor equals the gt cell's
    trg = torch.eye(30).reshape(30, 5, 6)
    peak = torch.tensor([[2, 3]])
    good = gaussian_cross_entropy(trg[:, 3, 2][None], trg, peak, temperature=0.03, kernel_size=1, sigma=1.0)
    bad = gaussian_cross_entropy(trg[:, 0, 0][None], trg, peak, temperature=0.03, kernel_size=1, sigma=1.0)
    assert good.item() < 1e-6 and bad.item() > 30.0


def test_invisible_and_off_grid_keypoints_are_masked():
    tf = transform((40, 60), 56, 14, "pad")  # grid 3 x 4, padding below the image
    src_xy = np.array([[10.0, 10.0], [30.0, 20.0], [20.0, 5.0], [50.0, 30.0]])
    trg_xy = np.array([[12.0, 11.0], [29.0, 19.0], [np.nan, np.nan], [80.0, 30.0]])
    visible = np.array([True, False, False, True])
    tgt = keypoint_targets(src_xy, trg_xy, visible, tf, tf)
    assert tgt.valid.tolist() == [True, False, False, False]  # hidden, hidden + NaN, gt right of the grid
    assert torch.isfinite(tgt.src_cells).all()

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    loss, count = batch_loss(feats[:1], feats[1:], [tgt], [(3, 4)], [(3, 4)])
    alone, _ = batch_loss(
        feats[:1], feats[1:], [keypoint_targets(src_xy[:1], trg_xy[:1], visible[:1], tf, tf)], [(3, 4)], [(3, 4)]
    )
    assert count == 1 and torch.isclose(loss, alone)
    # padding cells (row 3) never enter the loss
    loss.backward()
    assert feats.grad[1, :, 3].abs().sum() == 0 and feats.grad[1, :, :3].abs().sum() > 0

    none, count = batch_loss(feats[:1], feats[1:], [keypoint_targets(src_xy, trg_xy, np.zeros(4, bool), tf, tf)], [(3, 4)], [(3, 4)])
    assert count == 0 and none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("resize", ["pad", "squash"])
@pytest.mark.parametrize("image_hw", [(37, 91), (120, 45), (64, 64)])
def test_gaussian_peak_is_the_cell_holding_the_gt_pixel(resize, image_hw):
    """Peak = transform.nearest_cell(gt) = the matcher's argmax cell for a one-hot map at
    the gt cell, and the gt pixel lies inside that cell's box, for points just either
    side of every cell border."""
    tf = transform(image_hw, 70, 14, resize)
    h, w = image_hw
    borders_x = np.array([tf.cell_box(0, j)[2] for j in range(tf.grid_w - 1)])
    borders_y = np.array([tf.cell_box(i, 0)[3] for i in range(tf.grid_h - 1)])
    xs = np.concatenate([borders_x - 1e-3, borders_x + 1e-3, [0.0, w - 1.0]])
    ys = np.concatenate([borders_y - 1e-3, borders_y + 1e-3, [0.0, h - 1.0]])
    xs, ys = np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1)
    xy = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    tgt = keypoint_targets(xy, xy, np.ones(len(xy), bool), tf, tf)
    assert tgt.valid.all()
    maps = gaussian_target(tgt.trg_peak, (tf.grid_h, tf.grid_w))
    flat = maps.reshape(len(xy), -1).argmax(dim=1)
    peak = torch.stack([flat % tf.grid_w, flat // tf.grid_w], -1)
    assert torch.equal(peak, torch.from_numpy(tf.nearest_cell(xy)))
    for (x, y), (j, i) in zip(xy, peak.tolist()):
        x0, y0, x1, y1 = tf.cell_box(i, j)
        assert x0 <= x < x1 and y0 <= y < y1
    # one-hot target maps: cell (i, j) carries feature e_k, k = i * w + j; query e_k at the gt cell
    n_cells = tf.grid_h * tf.grid_w
    one_hot = torch.eye(n_cells).reshape(n_cells, tf.grid_h, tf.grid_w)
    query = one_hot[:, tgt.trg_peak[:, 1], tgt.trg_peak[:, 0]].T  # [P, C]
    cells, _ = match_keypoints(query[:, None], one_hot, method="argmax")
    assert torch.equal(cells[:, 0].long(), peak)
