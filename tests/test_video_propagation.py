"""The label-propagation rule (`pipeline.propagation`): hand-made affinities where the first
frame's global reach, the radius of the recent frames and the top-k are observable; the
tiled, streaming implementation against a dense brute force; int8 selection against float32;
labels to the grid and back through `CellTransform`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semcorr.pipeline.coords import CellTransform
from semcorr.pipeline.propagation import (check_conf, grid_to_keypoints, grid_to_mask, keypoints_to_grid,
                                          mask_to_grid, propagate)

EXACT = {"select": "float32"}


def run(feats: torch.Tensor, labels: torch.Tensor, **conf) -> list[torch.Tensor]:
    """``feats: [T, C, h, w]`` -> the labels of frames 1..T-1."""
    out = list(propagate(lambda t: feats[t], len(feats), labels, {**EXACT, **conf}))
    assert [t for t, _ in out] == list(range(1, len(feats)))
    return [labels for _, labels in out]


def brute_force(feats: torch.Tensor, labels: torch.Tensor, n_context: int, radius: float, topk: int,
                temperature: float) -> list[torch.Tensor]:
    """The rule written densely: every affinity of every context frame, masked, top-k, softmax."""
    t_len, _, h, w = feats.shape
    x = torch.nn.functional.normalize(feats.half().float().flatten(2).transpose(1, 2), dim=2)  # [T, N, C]
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([gy.flatten(), gx.flatten()], 1).double()
    near = torch.cdist(cells, cells) < radius
    bank, out = [labels.flatten(1).T.float()], []
    for t in range(1, t_len):
        context = [0] + list(range(max(1, t - n_context), t))
        scores = torch.cat([x[t] @ x[s].T if s == 0 else (x[t] @ x[s].T).masked_fill(~near, -math.inf)
                            for s in context], 1)
        values, index = scores.topk(min(topk, scores.shape[1]), dim=1)
        weights = torch.softmax(values / temperature, dim=1)
        bank.append((torch.cat([bank[s] for s in context])[index] * weights[..., None]).sum(1))
        out.append(bank[-1].T.reshape(-1, h, w))
    return out


def one_hot_features(assignment: list[int], width: int) -> torch.Tensor:
    """A 1 x width grid whose cell j carries basis vector ``assignment[j]``: ``[width, 1, width]``."""
    return torch.eye(width)[assignment].T[:, None, :].contiguous()


def test_the_first_frame_is_reached_everywhere_and_top_1_copies_its_best_match():
    width = 9
    frame0 = one_hot_features(list(range(width)), width)
    frame1 = one_hot_features(list(reversed(range(width))), width)  # cell j looks like frame 0's cell 8 - j
    labels = torch.eye(width)[:, None, :]  # label j on cell j
    (out,) = run(torch.stack([frame0, frame1]), labels, topk=1, radius=1.0)
    assert torch.equal(out[:, 0].argmax(0), torch.arange(width - 1, -1, -1))  # from 8 cells away: no radius there


def test_recent_frames_are_reached_only_within_the_radius():
    width = 9
    eye = torch.eye(2 * width)
    frame0 = eye[:width].T[:, None, :]  # cell j: e_j
    frame1 = ((eye[:width] + eye[width:]) / 2 ** 0.5).T[:, None, :]  # cell j: like frame 0's cell j, and more
    frame2 = frame1.clone()
    # frame 2, cell 0: like frame 1's cell 6 (6 cells away), less like its cell 1 (1 cell away), unlike frame 0
    frame2[:, 0, 0] = eye[width + 6] + 0.8 * eye[width + 1]
    labels = torch.eye(width)[:, None, :]
    feats = torch.stack([frame0, frame1, frame2])
    for radius, source in ((2.0, 1), (6.0, 1), (7.0, 6)):  # distance 6 is not < 6
        first, second = run(feats, labels, topk=1, radius=radius)
        assert torch.equal(first[:, 0].argmax(0), torch.arange(width))  # frame 1 took frame 0's labels
        assert int(second[:, 0, 0].argmax()) == source, radius


def test_top_k_keeps_exactly_the_k_best_and_weighs_them_by_a_softmax():
    width, tau = 6, 0.1
    frame0 = torch.eye(width)[:, None, :]
    target = torch.tensor([1.0, 0.875, 0.75, 0.25, 0.125, 0.0])  # frame 1, cell 0, against frame 0's cells (fp16-exact)
    frame1 = frame0.clone()
    frame1[:, 0, 0] = target
    labels = torch.eye(width)[:, None, :]
    cosine = target / target.norm()
    for k in (1, 2, 3):
        (out,) = run(torch.stack([frame0, frame1]), labels, topk=k, temperature=tau)
        expected = torch.zeros(width)
        expected[:k] = torch.softmax(cosine[:k] / tau, 0)
        torch.testing.assert_close(out[:, 0, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("t_len, c, h, w, n_context, radius, topk, tile, key_block", [
    (7, 16, 5, 7, 2, 2.0, 3, 2, 2),       # tiles do not divide the grid; key frames in blocks of 2
    (9, 24, 9, 11, 3, 3.5, 5, 4, 3),      # radius between integers
    (4, 8, 3, 3, 5, 1.0, 10, 4, 8),       # more context than frames, top-k beyond a window
    (12, 24, 10, 13, 20, 12.0, 10, 4, 3),  # SFC's settings: the radius covers the grid
    (2, 8, 4, 4, 20, 12.0, 10, 3, 8),     # one target frame
    (6, 16, 19, 21, 3, 5.0, 10, 6, 1),    # the default tile, with partial tiles at both edges; one key per step
    (17, 8, 6, 7, 3, 2.5, 4, 3, 2),       # the ring of pending targets wraps several times
])
def test_the_streaming_tiled_rule_equals_the_dense_brute_force(t_len, c, h, w, n_context, radius, topk, tile,
                                                               key_block):
    torch.manual_seed(t_len * 100 + c)
    feats = torch.randn(t_len, c, h, w).cumsum(0)  # frames alike, as in a video
    labels = torch.rand(3, h, w)
    got = run(feats, labels, n_context=n_context, radius=radius, topk=topk, tile=tile, key_block=key_block, block=7)
    want = brute_force(feats, labels, n_context, radius, topk, 0.05)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=0)


def test_int8_selection_gives_the_float32_result_up_to_near_ties():
    torch.manual_seed(0)
    feats = torch.randn(10, 64, 8, 10).cumsum(0)
    labels = torch.rand(4, 8, 10)
    exact = run(feats, labels, n_context=4, radius=3.0, topk=5)
    fast = run(feats, labels, n_context=4, radius=3.0, topk=5, select="int8")
    assert max(float((a - b).abs().max()) for a, b in zip(exact, fast)) < 0.02


def test_a_frame_with_another_grid_and_bad_settings_are_refused():
    feats = [torch.randn(8, 4, 5), torch.randn(8, 4, 6)]
    with pytest.raises(ValueError, match="frame 1: features are"):
        list(propagate(lambda t: feats[t], 2, torch.rand(2, 4, 5)))
    with pytest.raises(ValueError, match="labels are"):
        list(propagate(lambda t: feats[0], 2, torch.rand(2, 5, 5)))
    with pytest.raises(ValueError, match="unknown propagation settings"):
        check_conf({"radious": 3})


# -- labels on the grid and back --------------------------------------------------------------


def transform(image_hw=(40, 56), patch=8) -> CellTransform:
    h, w = image_hw
    return CellTransform.from_resize((h, w), (h, w), (0.0, 0.0), patch, (-(-h // patch), -(-w // patch)))


def test_masks_go_to_the_grid_as_area_shares_and_come_back_through_the_transform():
    tr = transform()
    labels = np.zeros((40, 56), dtype=np.uint8)
    labels[8:24, 16:40] = 1  # exactly cells rows 1-2, cols 2-4
    labels[0:4, 0:8] = 255  # void counts as background
    labels[36:40, 48:56] = 2  # half of cell (4, 6)
    soft = mask_to_grid(labels, 3, tr)
    assert soft.shape == (3, 5, 7)
    torch.testing.assert_close(soft.sum(0), torch.ones(5, 7))
    expected = torch.zeros(5, 7)
    expected[1:3, 2:5] = 1.0
    assert torch.equal(soft[1], expected)
    assert float(soft[2, 4, 6]) == pytest.approx(0.5) and float(soft[0, 0, 0]) == 1.0
    back = grid_to_mask(soft, tr)
    assert back.shape == (40, 56)
    assert (back[10:22, 18:38] == 1).all() and (back[:6] == 0).all()  # inside, away from the edge


def test_a_joint_on_a_cell_centre_comes_back_exactly_and_an_invisible_one_is_not_tracked():
    tr = transform()
    xy = np.array([[19.5, 11.5], [11.5, 27.5], [100.0, 100.0]])  # cell centres (j, i) = (2, 1), (1, 3); one off the image
    heat = keypoints_to_grid(xy, np.array([True, True, True]), tr)
    assert heat.shape == (3, 5, 7) and float(heat[0, 1, 2]) == 1.0 and float(heat[2].sum()) == 0.0
    got, tracked = grid_to_keypoints(heat, tr)
    np.testing.assert_allclose(got[:2], xy[:2], atol=1e-9)
    assert tracked.tolist() == [True, True, False] and np.isnan(got[2]).all()
    hidden = keypoints_to_grid(xy, np.array([True, False, True]), tr)
    assert float(hidden[1].sum()) == 0.0
