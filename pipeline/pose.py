"""Test-time adaptive pose alignment (GeoAware-SC, Zhang et al. CVPR 2024, Sec. 4.1), from the
feature cache alone.

For each pair the source is matched either as it is or horizontally mirrored, whichever
sits closer to the target by GeoAware-SC's instance-matching distance
(``utils_correspondence.get_distance``): every source foreground cell finds its nearest
target foreground cell by L2 distance between L2-normalised features, and the distance is
the mean of those nearest distances. The mirrored source is chosen when its distance is
strictly smaller. The features of a mirrored image are the store's ``feats_flip`` (a store
extracted with ``extract.flips: true``).

Foreground: the dataset's object mask (the images table's ``mask``, `pipeline.tables`) at
each feature cell's centre (`CellTransform.cells_to_pixels`), mirrored with the image; without
masks, every cell whose centre lies in the image (`PoseChoice.foreground` says which).
GeoAware-SC resizes maps and masks to 64 x 64 first; here the distance runs on each image's
own grid.

Keypoints of a mirrored source (`posed_pairs`): keypoint i of the mirrored object is the
mirror image of its counterpart's point, so its descriptor is sampled from ``feats_flip`` at
``coords.flip_points`` of the counterpart (the pair table's ``flip_index``, `pipeline.symmetry`);
without a ``flip_index`` every keypoint is its own counterpart (exact for the synthetic set,
whose keypoints are image points; the mirrored point for PF-PASCAL / PF-WILLOW, which carry no
keypoint ids). A keypoint whose counterpart the pair does not annotate keeps its unmirrored
descriptor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import CellTransform, flip_points
from semcorr.pipeline.tables import decode_mask, flatten, keypoints

POSES = ("none", "flip")
default_conf = {
    "cache_bytes": 2 << 30,  # foreground features kept in memory between pairs (float16)
    "chunk": 4096,  # source cells per similarity block
}


class PoseError(ValueError):
    """Pose alignment cannot run on this store or table; the message names the param to set."""


@dataclass
class PoseChoice:
    """Per pair (rows of the pair table): ``flip [P]`` bool, the mirrored source was closer;
    ``distance [P, 2]`` instance-matching distance of the (original, mirrored) source, NaN
    where a map has no foreground cell (then the original is kept); ``foreground``: ``mask``
    (the dataset's masks) or ``image`` (every cell on the image: no masks)."""

    flip: np.ndarray
    distance: np.ndarray
    foreground: str


def foreground_cells(transform: CellTransform, mask: np.ndarray | None = None, flip: bool = False) -> np.ndarray:
    """``[h, w]`` bool over the image's feature grid: the cell's centre lies in the image and,
    with ``mask`` (``[H, W]`` bool of the unmirrored image), on the object; ``flip``: for the
    mirrored image's grid (same transform, mask mirrored)."""
    h, w = transform.grid_h, transform.grid_w
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    xy = transform.cells_to_pixels(np.stack([gx, gy], axis=-1))  # [h, w, 2] pixel centres
    col, row = np.floor(xy[..., 0] + 0.5), np.floor(xy[..., 1] + 0.5)
    inside = (col >= 0) & (col < transform.image_w) & (row >= 0) & (row < transform.image_h)
    if mask is None:
        return inside
    if mask.shape != (transform.image_h, transform.image_w):
        raise PoseError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {transform.image_w}x{transform.image_h}")
    if flip:
        mask = mask[:, ::-1]
    out = np.zeros((h, w), dtype=bool)
    out[inside] = mask[row[inside].astype(np.intp), col[inside].astype(np.intp)]
    return out


def cell_descriptors(feats: torch.Tensor | np.ndarray, fg: np.ndarray) -> torch.Tensor:
    """``feats: [C, h, w]``, ``fg: [h, w]`` bool -> ``[n_fg, C]`` float16 L2-normalised rows."""
    feats = torch.as_tensor(np.asarray(feats) if isinstance(feats, np.ndarray) else feats)
    c = feats.shape[0]
    rows = feats.reshape(c, -1)[:, torch.from_numpy(fg.reshape(-1))].t().float()
    return F.normalize(rows, dim=1).half()


def instance_distance(src: torch.Tensor, trg: torch.Tensor, chunk: int = 4096) -> float:
    """GeoAware-SC's instance-matching distance. ``src: [Ns, C]``, ``trg: [Nt, C]`` unit rows
    (foreground cells) -> mean over source rows of the L2 distance to the nearest target row
    (``sqrt(2 - 2 cos)`` for unit vectors); NaN when either is empty."""
    if not len(src) or not len(trg):
        return float("nan")
    trg = trg.float()
    total = 0.0
    for start in range(0, len(src), chunk):
        best = (src[start : start + chunk].float() @ trg.t()).amax(dim=1)
        total += float((2.0 - 2.0 * best).clamp_min(0.0).sqrt().sum())
    return total / len(src)


def check_store(store) -> None:
    if not store.attrs.get("flips"):
        raise PoseError(f"{store.path}: pose alignment (match.argmax.pose_align: flip) needs the features of "
                        "the mirrored images: set `extract.flips: true` and re-run extract")


def choose_pose(store, pairs: pd.DataFrame, images: pd.DataFrame | None = None, conf: dict | None = None,
                log: Callable[[str], None] = lambda line: None) -> PoseChoice:
    """Original or mirrored source for every pair of ``pairs`` (prepared pair table), from
    ``store`` (a `FeatureStore` with flips) and the foreground masks of ``images`` (the images
    table; its ``mask`` column where present)."""
    conf = {**default_conf, **(conf or {})}
    check_store(store)
    masks = _masks(images)
    pairs = pairs.reset_index(drop=True)
    order = np.lexsort((pairs["target_id"].to_numpy(), pairs["source_id"].to_numpy()))
    cache = _Cells(store, masks, int(conf["cache_bytes"]))
    distance = np.full((len(pairs), 2), np.nan)
    every = max(1, len(pairs) // 10)
    for k, p in enumerate(order, 1):
        row = pairs.iloc[p]
        target = cache.get(row.target_id, False)
        for v, flip in enumerate((False, True)):
            distance[p, v] = instance_distance(cache.get(row.source_id, flip), target, int(conf["chunk"]))
        if k % every == 0 or k == len(pairs):
            log(f"pose: {k}/{len(pairs)} pairs")
    flip = distance[:, 1] < distance[:, 0]  # NaN compares False: keep the original
    return PoseChoice(flip=flip, distance=distance, foreground="mask" if masks else "image")


def posed_pairs(pairs: pd.DataFrame, flip: np.ndarray, widths: dict[str, int]) -> pd.DataFrame:
    """The pair table as matched after `choose_pose`: for a pair with ``flip``, each source
    keypoint's coordinates become those of its descriptor in the mirrored source (the
    counterpart's point through `coords.flip_points`); column ``source_flip`` (list<bool> per
    keypoint) says which keypoints read ``feats_flip``. ``widths``: image id -> width."""
    out = pairs.reset_index(drop=True).copy()
    has_index = "flip_index" in out.columns
    new_kps, used = [], []
    for p, row in enumerate(out.itertuples(index=False)):
        xy = keypoints(row.source_kps)
        mirrored = np.zeros(len(xy), dtype=bool)
        if flip[p]:
            index = getattr(row, "flip_index") if has_index else None
            index = np.arange(len(xy)) if index is None or _is_null(index) else np.asarray(index, dtype=np.int64)
            known = (index >= 0) & np.isfinite(xy[np.clip(index, 0, None)]).all(axis=1)
            flipped = flip_points(xy[np.clip(index, 0, None)], widths[row.source_id])
            xy = np.where(known[:, None], flipped, xy)
            mirrored = known
        new_kps.append(flatten(xy))
        used.append(mirrored.tolist())
    out["source_kps"], out["source_flip"] = new_kps, used
    return out


def pose_summary(predictions: pd.DataFrame) -> dict:
    """``{"pairs": P, "flipped_pairs": F, "mirrored_keypoints": K}`` of a predictions table
    with the ``pose_flip`` (per pair) and ``source_flip`` (per keypoint) columns."""
    per_pair = predictions.groupby("pair_id", sort=False)["pose_flip"].first()
    return {"pairs": int(len(per_pair)), "flipped_pairs": int(per_pair.sum()),
            "mirrored_keypoints": int(predictions["source_flip"].sum())}


def _is_null(value) -> bool:
    return np.ndim(value) == 0 and pd.isna(value)


def _masks(images: pd.DataFrame | None) -> dict[str, np.ndarray]:
    if images is None or "mask" not in images.columns:
        return {}
    return {r.image_id: decode_mask(r.mask, r.height, r.width) > 0 for r in images.itertuples(index=False)
            if r.mask is not None}


class _Cells:
    """(image id, mirrored) -> `cell_descriptors` of its foreground, read from the store once
    and kept while under ``budget`` bytes (least recently used out first)."""

    def __init__(self, store, masks: dict[str, np.ndarray], budget: int):
        self.store, self.masks, self.budget = store, masks, budget
        self.items: OrderedDict[tuple[str, bool], torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, image_id: str, flip: bool) -> torch.Tensor:
        key = (image_id, flip)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        fg = foreground_cells(self.store.transform(image_id), self.masks.get(image_id), flip)
        cells = cell_descriptors(self.store.features(image_id, flip=flip), fg)
        self.items[key] = cells
        self.bytes += cells.numel() * cells.element_size()
        while self.bytes > self.budget and len(self.items) > 1:
            _, dropped = self.items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        return cells
