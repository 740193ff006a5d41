"""Dense nearest-neighbour matching of source keypoint descriptors against target feature maps.

Matching is two steps that share one similarity computation:

1. argmax (`peaks`): cosine similarity of each source descriptor with every cell of the
   (optionally upsampled) target map; the best cell, its score, and the similarity window
   of radius ``max_window`` around it are kept;
2. soft-argmax (`soft_argmax`): the expected cell under a softmax of the kept window at a
   temperature, refined from the kept windows alone, so a soft-argmax setting never
   recomputes (or re-runs) the argmax.

The tensor-level core (`match_keypoints`, `locate`, `mutual_nearest`) works on feature
tensors only; the fine-tuning validation reuses it. `match_pairs` runs step 1 over a
prepared pair table and a `FeatureStore`, reading every image's features at most once per
role: pass 1 samples the source descriptors of all pairs per source image, pass 2 matches
all pairs that share a target with one matrix product, and (only with ``mutual``) pass 3
matches the predicted target cells back against each source map. `refine` runs step 2 on
its output.

With ``pose_align: flip`` (GeoAware-SC's test-time pose alignment, `pipeline.pose`) each pair
first chooses between its source's original and mirrored features; the keypoints of a
mirrored source are read from the store's ``feats_flip`` at their counterparts' mirrored
points (`pose.posed_pairs`), in the same passes (each source map, original or mirrored, read
once per pass). The predictions table gains ``pose_flip`` (per pair) and ``source_flip``
(per keypoint), and `Matches.unaligned` holds the argmax the pairs would get without the
alignment (the mirrored pairs matched again from their original source), so the alignment
is measured against no alignment on the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import (cells_to_pixels_rows, clamp_to_image, flat_index_to_cells, round_cells,
                                     sample_map, upsampled_cells_to_cells)
from semcorr.pipeline.pose import POSES, PoseChoice, choose_pose, posed_pairs
from semcorr.pipeline.tables import keypoints

METHODS = ("argmax", "softargmax")
PREDICTION_COLUMNS = ["pair_id", "kp_index", "x", "y", "score", "reliable", "visible"]

default_conf = {
    "upsample": 1,  # bilinear upsampling factor of the target map before matching
    "mutual": False,  # flag matches whose target cell does not match back to the source cell
    "max_window": 7,  # radius (cells of the matched map) of the similarity windows kept for soft-argmax
    "pose_align": "none",  # none | flip: match each pair from the original or mirrored source, the closer one
}
default_soft_conf = {
    "window": 3,  # soft-argmax window radius, in cells of the (upsampled) matched map
    "temperature": 0.1,  # softmax temperature on cosine similarities
    "zero_outside": False,  # GeoAware-SC: softmax over the whole map, similarities outside the window set to 0
}


@dataclass
class Peaks:
    """Argmax of Q similarity maps and the windows around it (cells of the matched map).

    cells: [Q, 2] int64 (gx, gy) of the best cell; scores: [Q] peak similarity;
    windows: [Q, 2R+1, 2R+1] similarity at peak + (dy, dx), NaN off the map; grid: (h, w).
    """

    cells: torch.Tensor
    scores: torch.Tensor
    windows: torch.Tensor
    grid: tuple[int, int]


def peaks(sim: torch.Tensor, max_window: int) -> Peaks:
    """sim: [Q, h, w] similarity maps -> their argmax and the windows of radius ``max_window``.

    Ties go to the first cell in row-major order (smallest gy, then smallest gx): the
    lowest flat index, which is what ``torch.max`` returns (tested)."""
    q, h, w = sim.shape
    flat = sim.reshape(q, h * w)
    scores, index = flat.max(dim=1)
    cells = flat_index_to_cells(index, w)  # [Q, 2] long
    offsets = torch.arange(-max_window, max_window + 1, device=sim.device)
    jx = cells[:, :1, None] + offsets[None, None, :]  # [Q, 1, K]
    jy = cells[:, 1:, None] + offsets[None, :, None]  # [Q, K, 1]
    jx, jy = torch.broadcast_tensors(jx, jy)
    valid = (jx >= 0) & (jx < w) & (jy >= 0) & (jy < h)
    index = (jy.clamp(0, h - 1) * w + jx.clamp(0, w - 1)).reshape(q, -1)
    windows = flat.gather(1, index).reshape(jx.shape).masked_fill(~valid, float("nan"))
    return Peaks(cells, scores, windows, (h, w))


def soft_argmax(cells: torch.Tensor, windows: torch.Tensor, grid: torch.Tensor | tuple[int, int], window: int,
                temperature: float, zero_outside: bool) -> torch.Tensor:
    """Windowed soft-argmax from kept windows -> ``[Q, 2]`` continuous (gx, gy), same grid.

    cells: [Q, 2] argmax cells; windows: [Q, 2R+1, 2R+1] (NaN off the map), R >= ``window``;
    grid: (h, w) or [Q, 2] (h, w) per row. Softmax at ``temperature`` over the cells within
    ``window`` of the peak; with ``zero_outside`` (GeoAware-SC) over the whole map, with
    every cell outside the window at similarity 0 (their sums are closed-form).
    """
    radius = (windows.shape[-1] - 1) // 2
    if window > radius:
        raise ValueError(f"soft-argmax window {window} exceeds the kept windows' radius {radius}")
    local = windows[:, radius - window : radius + window + 1, radius - window : radius + window + 1].double()
    valid = torch.isfinite(local)
    offsets = torch.arange(-window, window + 1, dtype=torch.float64, device=local.device)
    xs = cells[:, 0, None, None].double() + offsets[None, None, :]
    ys = cells[:, 1, None, None].double() + offsets[None, :, None]
    logits = torch.where(valid, local / temperature, torch.tensor(float("-inf"), dtype=torch.float64))
    top = logits.flatten(1).max(1).values  # finite: the peak is always valid
    q = len(cells)
    if zero_outside:
        top = torch.maximum(top, torch.zeros_like(top))  # outside cells have logit 0
    weights = torch.exp(logits - top[:, None, None])  # 0 off the map
    z = weights.flatten(1).sum(1)
    gx = (weights * xs).flatten(1).sum(1)
    gy = (weights * ys).flatten(1).sum(1)
    if zero_outside:
        hw = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 2).expand(q, 2)
        h, w = hw[:, 0], hw[:, 1]
        n_in = valid.flatten(1).sum(1).double()
        in_x = torch.where(valid, xs.expand_as(local), torch.zeros((), dtype=torch.float64)).flatten(1).sum(1)
        in_y = torch.where(valid, ys.expand_as(local), torch.zeros((), dtype=torch.float64)).flatten(1).sum(1)
        outside = torch.exp(-top)  # weight of one outside cell
        z = z + outside * (h * w - n_in)
        gx = gx + outside * (h * w * (w - 1) / 2 - in_x)
        gy = gy + outside * (w * h * (h - 1) / 2 - in_y)
    return torch.stack([gx / z, gy / z], dim=1).float()


def similarity(src_desc: torch.Tensor, trg_feats: torch.Tensor, upsample: int = 1) -> torch.Tensor:
    """Cosine similarity maps.

    src_desc: [P, N, C] descriptors of N source keypoints for P pairs.
    trg_feats: [C, h, w] one target map shared by all P pairs, or [P, C, h, w] one per pair.
    Returns [P * N, h', w'] on the target map upsampled ``upsample`` times (bilinear).
    """
    p, n, c = src_desc.shape
    shared = trg_feats.dim() == 3
    trg = trg_feats[None] if shared else trg_feats
    if trg.shape[1] != c:
        raise ValueError(f"descriptor dim {c} != target feature dim {trg.shape[1]}")
    trg = trg.float()
    if upsample > 1:
        trg = F.interpolate(trg, scale_factor=upsample, mode="bilinear", align_corners=False)
    h, w = trg.shape[-2:]
    trg = trg.flatten(2)  # [B, C, h*w]
    # cosine: scale the products by the inverse cell norms (cheaper than normalising the map)
    inv_norm = torch.linalg.vector_norm(trg, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()  # [B, 1, h*w]
    query = F.normalize(src_desc.float(), dim=-1)
    if shared:
        return (query.reshape(p * n, c) @ trg[0]).mul_(inv_norm[0]).view(p * n, h, w)
    return torch.bmm(query, trg).mul_(inv_norm).view(p * n, h, w)


def match_keypoints(
    src_desc: torch.Tensor,
    trg_feats: torch.Tensor,
    method: str = "argmax",
    window: int = 3,
    temperature: float = 0.1,
    zero_outside: bool = False,
    upsample: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict where each source descriptor lies in the target map.

    src_desc: [P, N, C]; trg_feats: [C, h, w] shared by the P pairs, or [P, C, h, w].
    Returns (cells [P, N, 2] continuous (gx, gy) on the STORED h x w grid,
    scores [P, N] the peak cosine similarity). Pixels: ``transform.cells_to_pixels(cells)``.
    """
    p, n, _ = src_desc.shape
    cells, scores = locate(similarity(src_desc, trg_feats, upsample), method, window, temperature, zero_outside)
    if upsample > 1:
        cells = upsampled_cells_to_cells(cells, upsample)
    return cells.view(p, n, 2), scores.view(p, n)


def locate(
    sim: torch.Tensor, method: str, window: int, temperature: float, zero_outside: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """sim: [Q, h, w] similarity maps -> (cells [Q, 2] (gx, gy) on this grid, scores [Q] peak similarity)."""
    if method not in METHODS:
        raise ValueError(f"match method must be one of {METHODS}, got {method!r}")
    found = peaks(sim, window if method == "softargmax" else 0)
    if method == "argmax":
        return found.cells.to(sim.dtype), found.scores
    cells = soft_argmax(found.cells, found.windows, found.grid, window, temperature, zero_outside)
    return cells.to(sim.dtype), found.scores


def mutual_nearest(trg_desc: torch.Tensor, src_feats: torch.Tensor, src_cells: torch.Tensor) -> torch.Tensor:
    """Mutual-nearest-neighbour check.

    trg_desc: [Q, C] target descriptors at the predicted locations; src_feats: [C, h, w] source map;
    src_cells: [Q, 2] source keypoints in cell coords. -> [Q] bool: the argmax of each target
    descriptor over the source map lies within one cell (Chebyshev) of the keypoint's cell.
    """
    c, h, w = src_feats.shape
    sim = F.normalize(trg_desc.float(), dim=-1) @ F.normalize(src_feats.float().reshape(c, h * w), dim=0)
    back = flat_index_to_cells(sim.argmax(dim=1), w)
    own = round_cells(src_cells, h, w)
    return ((back - own).abs() <= 1).all(dim=1)


# -- over a pair table and a feature store ------------------------------------------------


@dataclass
class Matches:
    """Argmax matches of a pair table, one row per keypoint (K rows), with what the
    soft-argmax needs to refine them without the features.

    table: the predictions table (`PREDICTION_COLUMNS`), x, y in original target pixels,
        clamped to the target image (a partial last cell's centre can lie in the padding);
    peaks: [K, 2] int32 argmax cell (gx, gy) on the matched (upsampled) target grid, -1 if none;
    windows: [K, 2R+1, 2R+1] float32 similarity around the peak (NaN off the map or none);
    grids: [K, 2] int32 (h, w) of the matched grid; transforms: [K, 8] the target's
    `CellTransform` (stored grid); upsample: the factor of the matched grid.
    With pose alignment: pose, the per-pair `pose.PoseChoice`; unaligned, the table
    (pair_id, kp_index, x, y) of the argmax without the alignment.
    """

    table: pd.DataFrame
    peaks: np.ndarray
    windows: np.ndarray
    grids: np.ndarray
    transforms: np.ndarray
    upsample: int
    pose: "PoseChoice | None" = None
    unaligned: pd.DataFrame | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays (for ``np.savez``); `from_arrays` reads them back."""
        return {"peaks": self.peaks, "windows": self.windows, "grids": self.grids, "transforms": self.transforms,
                "upsample": np.asarray(self.upsample)}

    @classmethod
    def from_arrays(cls, table: pd.DataFrame, arrays) -> "Matches":
        return cls(table, arrays["peaks"], arrays["windows"], arrays["grids"], arrays["transforms"],
                   int(arrays["upsample"]))


def check_conf(conf: dict, defaults: dict = default_conf) -> dict:
    """``defaults`` updated by ``conf``; raises ValueError on unknown keys or bad values."""
    unknown = set(conf) - set(defaults)
    if unknown:
        raise ValueError(f"unknown match settings {sorted(unknown)}; known: {sorted(defaults)}")
    conf = {**defaults, **conf}
    for key in ("upsample",):
        if key in conf and (int(conf[key]) < 1 or int(conf[key]) != conf[key]):
            raise ValueError(f"match {key} must be a positive integer, got {conf[key]!r}")
    for key in ("max_window", "window"):
        if key in conf and (int(conf[key]) < 0 or int(conf[key]) != conf[key]):
            raise ValueError(f"match {key} must be an integer >= 0, got {conf[key]!r}")
    if "pose_align" in conf and conf["pose_align"] not in POSES:
        raise ValueError(f"match pose_align must be one of {', '.join(POSES)}, got {conf['pose_align']!r}")
    if "temperature" in conf and not (isinstance(conf["temperature"], (int, float)) and conf["temperature"] > 0):
        raise ValueError(f"match temperature must be > 0, got {conf['temperature']!r}")
    return conf


def match_pairs(store, pairs: pd.DataFrame, conf: dict | None = None,
                log: Callable[[str], None] = lambda message: None, images: pd.DataFrame | None = None) -> Matches:
    """Argmax-match every pair of ``pairs`` (prepared pair table) with the features of
    ``store`` (`pipeline.store.FeatureStore`); ``conf``: `default_conf` keys; ``log`` gets
    a line per tenth of each pass. Keypoints without finite source coordinates get NaN x,
    y, score and reliable=False. ``images``: the images table, whose masks are the
    foreground of pose alignment (``pose_align: flip``; without masks, the whole image)."""
    conf = check_conf(conf or {})
    missing = sorted(set(pairs["source_id"]).union(pairs["target_id"]) - set(store.image_ids))
    if missing:
        raise KeyError(f"{store.path}: no features for {len(missing)} images of the pair table, e.g. {missing[:3]}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # one core for the store's reader thread: oversubscribed it is ~4x slower
    args = (int(conf["upsample"]), bool(conf["mutual"]), int(conf["max_window"]), log)
    try:
        if conf["pose_align"] == "none":
            return _match_pairs(store, pairs, *args)
        return _match_posed(store, pairs.reset_index(drop=True), images, *args)
    finally:
        torch.set_num_threads(threads)


def _match_posed(store, pairs: pd.DataFrame, images: pd.DataFrame | None, upsample: int, mutual: bool,
                 max_window: int, log: Callable[[str], None]) -> Matches:
    """`match_pairs` with pose alignment: the choice, the posed matching, and the unaligned argmax."""
    choice = choose_pose(store, pairs, images, log=log)
    widths = {image_id: store.transform(image_id).image_w for image_id in set(pairs["source_id"])}
    matches = _match_pairs(store, posed_pairs(pairs, choice.flip, widths), upsample, mutual, max_window, log)
    counts = matches_per_pair(pairs)
    matches.table["pose_flip"] = np.repeat(choice.flip, counts)
    unaligned = matches.table[["pair_id", "kp_index", "x", "y"]].copy()
    if choice.flip.any():  # the mirrored pairs as they would be matched from their original source
        again = _match_pairs(store, pairs[choice.flip], upsample, False, 0, log).table
        rows = np.repeat(choice.flip, counts)
        unaligned.loc[rows, ["x", "y"]] = again[["x", "y"]].to_numpy()
    matches.pose, matches.unaligned = choice, unaligned
    return matches


def matches_per_pair(pairs: pd.DataFrame) -> np.ndarray:
    """``[P]`` number of source keypoints (prediction rows) of each pair."""
    return np.array([len(keypoints(flat)) for flat in pairs["source_kps"]], dtype=np.int64)


def _match_pairs(store, pairs: pd.DataFrame, upsample: int, mutual: bool, max_window: int,
                 log: Callable[[str], None]) -> Matches:
    kp = _KeypointIndex(pairs)
    passes = 3 if mutual else 2
    desc = _source_descriptors(store, kp, _Ticker(log, f"pass 1/{passes}, source descriptors", kp, "source_id"))
    side = 2 * max_window + 1
    pred_xy = np.full((kp.total, 2), np.nan)
    scores = np.full(kp.total, np.nan, dtype=np.float32)
    peak_cells = np.full((kp.total, 2), -1, dtype=np.int32)
    windows = np.full((kp.total, side, side), np.nan, dtype=np.float32)
    grids = np.zeros((kp.total, 2), dtype=np.int32)
    transforms = np.zeros((kp.total, 8), dtype=np.float64)
    trg_desc = torch.empty((kp.total, desc.shape[1]) if mutual else (0, 0))
    maps = _FloatMaps()
    tick = _Ticker(log, f"pass 2/{passes}, matching against targets", kp, "target_id")
    for target_id, rows, feats16 in _maps_with_rows(store, kp, "target_id"):
        tick()
        found = peaks(similarity(desc[rows][None], maps(feats16), upsample), max_window)
        cells = found.cells.to(torch.float64)
        if upsample > 1:
            cells = upsampled_cells_to_cells(cells, upsample)
        transform = store.transform(target_id)
        pred_xy[rows] = clamp_to_image(transform.cells_to_pixels(cells).numpy(), (transform.image_w, transform.image_h))
        scores[rows] = found.scores.numpy()
        peak_cells[rows] = found.cells.numpy()
        windows[rows] = found.windows.numpy()
        grids[rows] = found.grid
        transforms[rows] = transform.to_array()
        if mutual:
            trg_desc[rows] = sample_map(feats16, cells)
    reliable = kp.finite.copy()
    if mutual:
        tick = _Ticker(log, "pass 3/3, mutual check against sources", kp, "source_id")
        for source_id, rows, feats16 in _source_maps(store, kp):
            tick()
            src_cells = torch.from_numpy(store.transform(source_id).pixels_to_cells(kp.source_xy[rows]))
            reliable[rows] = mutual_nearest(trg_desc[rows], maps(feats16), src_cells).numpy()
    table = pd.DataFrame({
        "pair_id": kp.pair_ids,
        "kp_index": kp.kp_index,
        "x": pred_xy[:, 0],
        "y": pred_xy[:, 1],
        "score": scores,
        "reliable": reliable,
        "visible": kp.visible,
    })
    if kp.posed:
        table["source_flip"] = kp.source_flip
    return Matches(table, peak_cells, windows, grids, transforms, upsample)


def refine(matches: Matches, conf: dict | None = None) -> pd.DataFrame:
    """Soft-argmax predictions (``conf``: `default_soft_conf` keys) from argmax ``matches``:
    the same table with x, y refined; score and reliable are the argmax's."""
    conf = check_conf(conf or {}, default_soft_conf)
    table = matches.table.copy()
    rows = np.flatnonzero(matches.peaks[:, 0] >= 0)
    if len(rows):
        cells = soft_argmax(torch.from_numpy(matches.peaks[rows]), torch.from_numpy(matches.windows[rows]),
                            torch.from_numpy(matches.grids[rows]), int(conf["window"]), float(conf["temperature"]),
                            bool(conf["zero_outside"])).double()
        if matches.upsample > 1:
            cells = upsampled_cells_to_cells(cells, matches.upsample)
        transforms = matches.transforms[rows]
        xy = clamp_to_image(cells_to_pixels_rows(cells.numpy(), transforms), transforms[:, [7, 6]])
        table.loc[rows, "x"], table.loc[rows, "y"] = xy[:, 0], xy[:, 1]
    return table


class _KeypointIndex:
    """All keypoints of a pair table flattened into one row each, with the row ranges per pair."""

    def __init__(self, pairs: pd.DataFrame):
        self.pairs = pairs.reset_index(drop=True)
        src = [keypoints(flat) for flat in self.pairs["source_kps"]]
        counts = np.array([len(xy) for xy in src], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.count = counts
        self.total = int(counts.sum())
        self.source_xy = np.concatenate(src) if src else np.zeros((0, 2))
        self.finite = np.isfinite(self.source_xy).all(axis=1)
        self.visible = np.concatenate([np.asarray(v, dtype=bool) for v in self.pairs["visible"]]) if src else np.zeros(0, bool)
        self.pair_ids = np.repeat(self.pairs["pair_id"].to_numpy(), counts)
        self.posed = "source_flip" in self.pairs.columns  # `pose.posed_pairs`: keypoints read from feats_flip
        self.source_flip = (np.concatenate([np.asarray(v, dtype=bool) for v in self.pairs["source_flip"]])
                            if self.posed and src else np.zeros(self.total, bool))
        sources = np.repeat(self.pairs["source_id"].to_numpy(), counts)
        self.n_source_maps = len(set(zip(sources.tolist(), self.source_flip.tolist())))  # (image, mirrored?) read
        self.kp_index = np.arange(self.total) - np.repeat(self.start, counts)
        self._groups: dict[str, dict] = {}

    def groups(self, column: str) -> dict[str, np.ndarray]:
        """image id -> pair positions, for ``column`` source_id or target_id."""
        if column not in self._groups:
            self._groups[column] = {k: np.asarray(v) for k, v in self.pairs.groupby(column, sort=False).indices.items()}
        return self._groups[column]

    def rows_of(self, pair_positions: np.ndarray) -> np.ndarray:
        """Keypoint rows of the given pairs, concatenated in pair order."""
        starts, counts = self.start[pair_positions], self.count[pair_positions]
        return np.repeat(starts - np.cumsum(np.concatenate([[0], counts[:-1]])), counts) + np.arange(counts.sum())


class _Ticker:
    """Calls ``log`` with a progress line at every tenth of the images of one pass."""

    def __init__(self, log: Callable[[str], None], what: str, kp: "_KeypointIndex", column: str):
        total = len(kp.groups(column)) if column == "target_id" else kp.n_source_maps
        self.log, self.what, self.total, self.done = log, what, total, 0
        self.every = max(1, -(-self.total // 10))

    def __call__(self) -> None:
        self.done += 1
        if self.done == self.total or self.done % self.every == 0:
            self.log(f"match: {self.what}: {self.done}/{self.total} images")


def _source_descriptors(store, kp: _KeypointIndex, tick: Callable[[], None] = lambda: None) -> torch.Tensor:
    """Pass 1: ``[K, C]`` float32 descriptors of every keypoint, each source image read once
    and only the 4 neighbour cells of each keypoint converted from float16."""
    desc = torch.zeros((kp.total, store.attrs["feat_dim"]), dtype=torch.float32)
    for source_id, rows, feats16 in _source_maps(store, kp):
        tick()
        g = store.transform(source_id).pixels_to_cells(kp.source_xy[rows])
        desc[rows] = sample_map(feats16, g)
    return desc


def _source_maps(store, kp: _KeypointIndex) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """`_maps_with_rows` of the sources: the original maps for the keypoints read there, then
    (pose alignment) the mirrored maps for those read from ``feats_flip``."""
    yield from _maps_with_rows(store, kp, "source_id", flip=False)
    if kp.source_flip.any():
        yield from _maps_with_rows(store, kp, "source_id", flip=True)


def _maps_with_rows(store, kp: _KeypointIndex, column: str,
                    flip: bool | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(image id, keypoint rows with finite source coords, [C, h, w] float16 map)`` for every
    image of ``column`` (source_id or target_id) with such rows, read in bulk in storage order;
    ``flip`` (sources only): the rows read from the mirrored (True) or original (False) map.
    The map is only valid until the next item."""
    groups = kp.groups(column)
    wanted = {}
    for image_id, positions in groups.items():
        rows = kp.rows_of(positions)
        keep = kp.finite[rows] if flip is None else kp.finite[rows] & (kp.source_flip[rows] == flip)
        rows = rows[keep]
        if len(rows):
            wanted[store.index(image_id)] = (image_id, rows)
    for n, feats16 in store.iter_maps(wanted, flip=bool(flip)):
        image_id, rows = wanted[n]
        yield image_id, rows, feats16


class _FloatMaps:
    """float16 ``[C, h, w]`` map -> float32 ``[C, h, w]`` view of one reused buffer, laid out
    cell-major (each cell's channels together: the layout of the matrix product and the
    norms). Reusing the buffer avoids a fresh 11 MB allocation (page faults) per map."""

    def __init__(self):
        self.buffer = torch.empty(0)

    def __call__(self, feats16: np.ndarray) -> torch.Tensor:
        c, h, w = feats16.shape
        if self.buffer.numel() < c * h * w:
            self.buffer = torch.empty(c * h * w)
        cells = self.buffer[: c * h * w].view(h, w, c)
        cells.copy_(torch.from_numpy(feats16.transpose(1, 2, 0)))
        return cells.permute(2, 0, 1)
