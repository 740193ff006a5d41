"""The coordinate convention: pixel centres, resize, feature cells, bilinear sampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import (
    CellTransform,
    flat_index_to_cells,
    flip_points,
    from_matlab,
    sample_cells,
    upsampled_cells_to_cells,
)

# A 100 x 50 (W x H) image into a 56 px input with patch 14.
PAD = CellTransform.from_resize((50, 100), (28, 56), (0, 0), 14, (2, 4))
SQUASH = CellTransform.from_resize((50, 100), (56, 56), (0, 0), 14, (4, 4))


@pytest.mark.parametrize("t", [PAD, SQUASH], ids=["pad", "squash"])
def test_pixels_cells_roundtrip(t):
    xy = np.random.default_rng(0).uniform([-0.5, -0.5], [99.5, 49.5], size=(50, 2))
    np.testing.assert_allclose(t.cells_to_pixels(t.pixels_to_cells(xy)), xy, atol=1e-9)
    torch.testing.assert_close(t.cells_to_pixels(t.pixels_to_cells(torch.tensor(xy))), torch.tensor(xy))


def test_cell_boxes_tile_the_image_edge_to_edge():
    # pad: 100 px -> 56 px, so a 14 px cell is 25 original px wide; rows: 50 -> 28 px, 2 cells.
    assert PAD.cell_box(0, 0) == pytest.approx((-0.5, -0.5, 24.5, 24.5))
    assert PAD.cell_box(1, 3) == pytest.approx((74.5, 24.5, 99.5, 49.5))
    # squash: 50 rows -> 56 px, a cell is 12.5 rows high.
    assert SQUASH.cell_box(3, 0)[1:4:2] == pytest.approx((37, 49.5))


def test_nearest_cell_is_the_cell_whose_box_holds_the_point():
    for t in (PAD, SQUASH):
        for i in range(t.grid_h):
            for j in range(t.grid_w):
                x0, y0, x1, y1 = t.cell_box(i, j)
                inside = np.array([[x0 + 1e-6, y0 + 1e-6], [x1 - 1e-6, y1 - 1e-6], [(x0 + x1) / 2, (y0 + y1) / 2]])
                assert (t.nearest_cell(inside) == [j, i]).all()


def test_transform_matches_real_resampling():
    """A single bright pixel, resized like `Backbone.preprocess`, lands where the transform says."""
    h, w, x0, y0 = 60, 90, 37, 11
    image = torch.zeros(1, 1, h, w)
    image[..., y0, x0] = 1.0
    resized = F.interpolate(image, size=(40, 60), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    centroid = torch.stack([(resized * xs).sum(), (resized * ys).sum()]) / resized.sum()
    # patch 1: cell coordinates are input pixel centres.
    t = CellTransform.from_resize((h, w), (40, 60), (0, 0), 1, (40, 60))
    np.testing.assert_allclose(t.pixels_to_cells(np.array([x0, y0], float)), centroid.numpy(), atol=1e-3)


def test_padding_offset_shifts_cells():
    t = CellTransform.from_resize((10, 10), (10, 10), (4, 2), 2, (7, 7))
    # pixel edge 1.0 -> input edge 5 (x) / 3 (y) -> centres of cells 2 and 1
    np.testing.assert_allclose(t.pixels_to_cells(np.array([0.5, 0.5])), [2.0, 1.0])


def test_sample_cells_exact_at_centres_and_bilinear_between():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    g = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [1.5, 0.5]]])
    out = sample_cells(feats, g)[0]
    torch.testing.assert_close(out[0], feats[0, :, 0, 0])
    torch.testing.assert_close(out[1], feats[0, :, 2, 3])
    expected = feats[0, :, 0:2, 1:3].mean(dim=(1, 2))
    torch.testing.assert_close(out[2], expected)


def test_upsampled_cells_map_back_to_stored_cells():
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # value = gx
    up = F.interpolate(ramp, scale_factor=4, mode="bilinear", align_corners=False)[0, 0, 0]
    g_up = torch.arange(4 * 8.0)
    interior = slice(2, -2)  # border cells are clamped by the resampler
    torch.testing.assert_close(up[interior], upsampled_cells_to_cells(g_up, 4)[interior])


def test_flat_index_and_helpers():
    torch.testing.assert_close(flat_index_to_cells(torch.tensor([0, 5, 11]), 4), torch.tensor([[0, 0], [1, 1], [3, 2]]))
    np.testing.assert_allclose(from_matlab(np.array([[1.0, 1.0], [10.0, 3.0]])), [[0, 0], [9, 2]])
    np.testing.assert_allclose(flip_points(np.array([[0.0, 5.0], [9.0, 1.0]]), 10), [[9, 5], [0, 1]])


def test_transform_array_roundtrip():
    assert CellTransform.from_array(PAD.to_array()) == PAD
