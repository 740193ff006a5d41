"""The one coordinate convention of semcorr. Every module that turns pixels into
feature cells or back (extraction, fine-tuning, matching, evaluation) calls this.

Pixels
    Keypoints are (x, y) in ORIGINAL-image pixels, 0-based, at pixel centres:
    the pixel in column c, row r has its centre at (x=c, y=r) and covers
    [c - 0.5, c + 0.5) x [r - 0.5, r + 0.5). The image spans
    [-0.5, W - 0.5] x [-0.5, H - 0.5]. Datasets that publish MATLAB 1-based
    coordinates are converted with `from_matlab` at prepare time, nowhere else.

Network input
    Preprocessing resizes the original image by (sx, sy) (input px per original
    px) with edge-aligned resampling (`align_corners=False` semantics) and then
    places it at (pad_x, pad_y) input pixels from the top-left corner. A point at
    pixel-centre x lands at u = (x + 0.5) * sx + pad_x - 0.5.

Feature cells
    Cell (i, j) of a patch-p grid covers input pixels [j*p, (j+1)*p) x [i*p, (i+1)*p)
    and has its centre at cell coordinate (gx, gy) = (j, i). So gx = (u + 0.5) / p - 0.5.

Composed, original pixels map to cell coordinates by an affine map per axis,
``g = scale * x + offset``, which `CellTransform` stores. Bilinear sampling at cell
coordinates uses `grid_sample(..., align_corners=False)` through `cells_to_grid`;
no other module converts coordinates by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CellTransform:
    """Affine map from original-image pixel centres to feature-cell centres.

    ``gx = scale_x * x + offset_x``, ``gy = scale_y * y + offset_y``; the stored
    feature grid is ``grid_h x grid_w`` cells and the original image ``image_h x image_w``.
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    grid_h: int
    grid_w: int
    image_h: int
    image_w: int

    @classmethod
    def from_resize(
        cls,
        image_hw: tuple[int, int],
        resized_hw: tuple[int, int],
        pad_xy: tuple[float, float],
        patch: int,
        grid_hw: tuple[int, int],
    ) -> "CellTransform":
        """Transform of an image resized to ``resized_hw``, placed at ``pad_xy``
        in the network input, and encoded by a patch-``patch`` grid of ``grid_hw`` cells."""
        (h, w), (rh, rw) = image_hw, resized_hw
        sx, sy = rw / w, rh / h
        return cls(
            scale_x=sx / patch,
            scale_y=sy / patch,
            offset_x=(0.5 * sx + pad_xy[0]) / patch - 0.5,
            offset_y=(0.5 * sy + pad_xy[1]) / patch - 0.5,
            grid_h=int(grid_hw[0]),
            grid_w=int(grid_hw[1]),
            image_h=int(h),
            image_w=int(w),
        )

    def to_array(self) -> np.ndarray:
        """``[8]`` float64, the layout stored per image in the feature store."""
        return np.array(list(asdict(self).values()), dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "CellTransform":
        s_x, s_y, o_x, o_y, gh, gw, ih, iw = (float(v) for v in values)
        return cls(s_x, s_y, o_x, o_y, int(gh), int(gw), int(ih), int(iw))

    def pixels_to_cells(self, xy: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``xy: [..., 2]`` original pixels -> ``[..., 2]`` continuous cell coords (gx, gy)."""
        scale, offset = self._affine(xy)
        return xy * scale + offset

    def cells_to_pixels(self, g: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``g: [..., 2]`` continuous cell coords -> ``[..., 2]`` original pixels."""
        scale, offset = self._affine(g)
        return (g - offset) / scale

    def nearest_cell(self, xy: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``xy: [..., 2]`` pixels -> ``[..., 2]`` integer (j, i) of the cell whose box holds
        the point, clamped to the grid. This is the cell the matcher maps a pixel to."""
        return round_cells(self.pixels_to_cells(xy), self.grid_h, self.grid_w)

    def cell_box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Pixel box ``(x0, y0, x1, y1)`` (edges, original image) covered by cell (i, j)."""
        x0, y0 = self.cells_to_pixels(np.array([j - 0.5, i - 0.5]))
        x1, y1 = self.cells_to_pixels(np.array([j + 0.5, i + 0.5]))
        return float(x0), float(y0), float(x1), float(y1)

    def _affine(self, like):
        scale = [self.scale_x, self.scale_y]
        offset = [self.offset_x, self.offset_y]
        if _is_tensor(like):
            import torch

            kw = dict(dtype=like.dtype if like.is_floating_point() else torch.float64, device=like.device)
            return torch.tensor(scale, **kw), torch.tensor(offset, **kw)
        return np.asarray(scale), np.asarray(offset)


def cells_to_pixels_rows(g: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """`CellTransform.cells_to_pixels` row by row: ``g: [K, 2]`` cell coords, each with its
    own transform (``transforms: [K, 8]``, `CellTransform.to_array` rows) -> ``[K, 2]`` pixels."""
    scale, offset = transforms[:, 0:2], transforms[:, 2:4]
    return (np.asarray(g, dtype=np.float64) - offset) / scale


def resized_points(xy: np.ndarray, image_wh: np.ndarray, side: int) -> np.ndarray:
    """``xy: [N, 2]`` pixel centres in images of ``image_wh: [N, 2]`` (width, height) ->
    the same points after resizing each image to ``side`` x ``side`` (edge-aligned, as
    preprocessing's squash: u = (x + 0.5) * side / width - 0.5)."""
    scale = side / np.asarray(image_wh, dtype=np.float64)
    return (np.asarray(xy, dtype=np.float64) + 0.5) * scale - 0.5


def clamp_to_image(xy: np.ndarray, image_wh: np.ndarray) -> np.ndarray:
    """``xy: [N, 2]`` -> the nearest points with pixel-centre coordinates inside the image
    (``0 <= x <= width - 1``, ``0 <= y <= height - 1``); ``image_wh: [N, 2]`` or ``[2]``; NaN stays NaN."""
    upper = np.asarray(image_wh, dtype=np.float64) - 1
    return np.clip(np.asarray(xy, dtype=np.float64), 0, upper)


def from_matlab(xy: np.ndarray) -> np.ndarray:
    """MATLAB 1-based pixel coordinates -> semcorr 0-based pixel centres."""
    return np.asarray(xy, dtype=np.float64) - 1.0


def flip_points(xy: np.ndarray, image_w: int) -> np.ndarray:
    """``xy: [N, 2]`` pixel centres in an image of width ``image_w`` -> the same points
    in its horizontal mirror."""
    out = np.array(xy, dtype=np.float64, copy=True)
    out[..., 0] = image_w - 1 - out[..., 0]
    return out


def round_cells(g: np.ndarray | torch.Tensor, grid_h: int, grid_w: int) -> np.ndarray | torch.Tensor:
    """``g: [..., 2]`` continuous cell coords -> ``[..., 2]`` int64 (j, i) of the cell whose box
    holds the point, clamped to the grid."""
    if _is_tensor(g):
        import torch

        j = torch.floor(g[..., 0] + 0.5).clamp(0, grid_w - 1)
        i = torch.floor(g[..., 1] + 0.5).clamp(0, grid_h - 1)
        return torch.stack([j, i], dim=-1).long()
    j = np.clip(np.floor(g[..., 0] + 0.5), 0, grid_w - 1)
    i = np.clip(np.floor(g[..., 1] + 0.5), 0, grid_h - 1)
    return np.stack([j, i], axis=-1).astype(np.int64)


def inside_cells(g: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """``g: [N, 2]`` continuous cell coords -> ``[N]`` bool: inside some cell's box."""
    return (g[:, 0] >= -0.5) & (g[:, 0] <= grid_w - 0.5) & (g[:, 1] >= -0.5) & (g[:, 1] <= grid_h - 0.5)


def cells_to_grid(g: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """``g: [..., 2]`` cell coords -> normalised coords for
    ``grid_sample(..., align_corners=False)`` on a ``grid_h x grid_w`` map."""
    import torch

    size = torch.tensor([grid_w, grid_h], dtype=g.dtype, device=g.device)
    return (2.0 * g + 1.0) / size - 1.0


def sample_cells(feats: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Bilinear features at continuous cell coordinates.

    feats: [B, C, h, w]; g: [B, N, 2] cell coords (gx, gy) -> [B, N, C].
    Points outside the grid take the border value.
    """
    grid = cells_to_grid(g.to(feats.dtype), feats.shape[-2], feats.shape[-1])
    import torch.nn.functional as F

    out = F.grid_sample(feats, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def sample_map(feats: np.ndarray | torch.Tensor, g: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bilinear features of one map at continuous cell coords, touching only the 4 neighbour
    cells of each point (no conversion of the whole map): `sample_cells` for the matcher's
    hot loop over float16 cached maps.

    feats: [C, h, w] any float dtype (e.g. the stored float16); g: [N, 2] cell coords (gx, gy)
    -> [N, C] float32: `sample_cells` on the float32 map (grid_sample,
    align_corners=False, border padding), up to float32 rounding; non-finite points give NaN.
    """
    import torch

    feats = feats.numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 2)
    c, h, w = feats.shape
    finite = np.isfinite(g).all(axis=1)
    # border padding: clamp into the grid; the far neighbour of the last cell has weight 0
    x = np.clip(np.where(finite, g[:, 0], 0.0), 0, w - 1)
    y = np.clip(np.where(finite, g[:, 1], 0.0), 0, h - 1)
    x0 = np.minimum(np.floor(x), max(w - 2, 0)).astype(np.intp)
    y0 = np.minimum(np.floor(y), max(h - 2, 0)).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]).astype(np.float32)  # [4, N]
    corners = feats[:, np.stack([y0, y0, y1, y1]), np.stack([x0, x1, x0, x1])].astype(np.float32)  # [C, 4, N]
    out = np.einsum("ckn,kn->nc", corners, weights)
    out[~finite] = np.nan
    return torch.from_numpy(out)


def upsampled_cells_to_cells(g_up: torch.Tensor | np.ndarray, factor: int):
    """Cell coords on a map upsampled by ``factor`` (bilinear, ``align_corners=False``)
    -> cell coords on the stored map."""
    return (g_up + 0.5) / factor - 0.5


def flat_index_to_cells(index: torch.Tensor, grid_w: int) -> torch.Tensor:
    """``index: [...]`` flat index into an ``h x w`` map -> ``[..., 2]`` cell coords (gx, gy)."""
    import torch

    return torch.stack([index % grid_w, torch.div(index, grid_w, rounding_mode="floor")], dim=-1)


def _is_tensor(value) -> bool:
    """A torch tensor, told apart without importing torch (numpy-only callers never load it)."""
    return type(value).__module__.startswith("torch")
