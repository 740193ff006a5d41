"""Dense nearest-neighbour matching of source keypoint descriptors against target feature maps.

The tensor-level core (`match_keypoints`, `locate`, `mutual_nearest`) works on feature
tensors only; the fine-tuning validation reuses it. `match_pairs` runs it over a prepared
pair table and a `FeatureStore`, reading every image's features at most once per role:
pass 1 samples the source descriptors of all pairs per source image, pass 2 matches all
pairs that share a target with one matrix product, and (only with ``mutual``) pass 3
matches the predicted target cells back against each source map.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semcorr.pipeline.coords import flat_index_to_cells, round_cells, sample_map, upsampled_cells_to_cells
from semcorr.pipeline.tables import keypoints

METHODS = ("argmax", "softargmax")

default_conf = {
    "method": "argmax",  # argmax | softargmax (windowed soft-argmax around the argmax)
    "upsample": 1,  # bilinear upsampling factor of the target map before matching
    "window": 3,  # soft-argmax window radius, in cells of the (upsampled) matched map
    "temperature": 0.1,  # softmax temperature on cosine similarities
    "zero_outside": False,  # GeoAware-SC: softmax over the whole map, similarities outside the window set to 0
    "mutual": False,  # flag matches whose target cell does not match back to the source cell
}

PREDICTION_COLUMNS = ["pair_id", "kp_index", "x", "y", "score", "reliable", "visible"]


def check_conf(conf: dict) -> dict:
    """``default_conf`` updated by ``conf``; raises ValueError on unknown keys or values."""
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise ValueError(f"unknown match settings {sorted(unknown)}; known: {sorted(default_conf)}")
    conf = {**default_conf, **conf}
    if conf["method"] not in METHODS:
        raise ValueError(f"match method must be one of {METHODS}, got {conf['method']!r}")
    if int(conf["upsample"]) < 1 or int(conf["upsample"]) != conf["upsample"]:
        raise ValueError(f"match upsample must be a positive integer, got {conf['upsample']!r}")
    if int(conf["window"]) < 0:
        raise ValueError(f"match window must be >= 0, got {conf['window']!r}")
    if not float(conf["temperature"]) > 0:
        raise ValueError(f"match temperature must be > 0, got {conf['temperature']!r}")
    return conf


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

    src_desc: [P, N, C] descriptors of N source keypoints for P pairs.
    trg_feats: [C, h, w] one target map shared by all P pairs, or [P, C, h, w] one per pair.
    Returns (cells [P, N, 2] continuous (gx, gy) on the STORED h x w grid,
    scores [P, N] the peak cosine similarity). Pixels: ``transform.cells_to_pixels(cells)``.
    """
    if method not in METHODS:
        raise ValueError(f"match method must be one of {METHODS}, got {method!r}")
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
        sim = (query.reshape(p * n, c) @ trg[0]).mul_(inv_norm[0]).view(p * n, h, w)
    else:
        sim = torch.bmm(query, trg).mul_(inv_norm).view(p * n, h, w)
    cells, scores = locate(sim, method, window, temperature, zero_outside)
    if upsample > 1:
        cells = upsampled_cells_to_cells(cells, upsample)
    return cells.view(p, n, 2), scores.view(p, n)


def locate(
    sim: torch.Tensor, method: str, window: int, temperature: float, zero_outside: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """sim: [Q, h, w] similarity maps -> (cells [Q, 2] (gx, gy) on this grid, scores [Q] peak similarity)."""
    q, h, w = sim.shape
    flat = sim.view(q, h * w)
    scores, index = flat.max(dim=1)
    peak = flat_index_to_cells(index, w)  # [Q, 2] long
    if method == "argmax":
        return peak.to(sim.dtype), scores
    if zero_outside:
        xs = torch.arange(w, device=sim.device)
        ys = torch.arange(h, device=sim.device)
        inside = ((xs[None] - peak[:, :1]).abs() <= window)[:, None, :] & (
            (ys[None] - peak[:, 1:]).abs() <= window
        )[:, :, None]
        weights = torch.softmax(torch.where(inside, sim, torch.zeros((), dtype=sim.dtype)).view(q, -1) / temperature, dim=1)
        weights = weights.view(q, h, w)
        gx = (weights.sum(1) * xs.to(sim.dtype)).sum(1)
        gy = (weights.sum(2) * ys.to(sim.dtype)).sum(1)
        return torch.stack([gx, gy], dim=1), scores
    offsets = torch.arange(-window, window + 1, device=sim.device)
    jx = peak[:, :1, None] + offsets[None, None, :]  # [Q, 1, K]
    jy = peak[:, 1:, None] + offsets[None, :, None]  # [Q, K, 1]
    jx, jy = torch.broadcast_tensors(jx, jy)
    valid = (jx >= 0) & (jx < w) & (jy >= 0) & (jy < h)
    cell_index = (jy.clamp(0, h - 1) * w + jx.clamp(0, w - 1)).view(q, -1)
    local = flat.gather(1, cell_index).masked_fill(~valid.view(q, -1), float("-inf"))
    weights = torch.softmax(local / temperature, dim=1)
    gx = (weights * jx.reshape(q, -1).to(sim.dtype)).sum(1)
    gy = (weights * jy.reshape(q, -1).to(sim.dtype)).sum(1)
    return torch.stack([gx, gy], dim=1), scores


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


def match_pairs(store, pairs: pd.DataFrame, conf: dict) -> pd.DataFrame:
    """Match every pair of ``pairs`` (prepared pair table) with the features of ``store``
    (`pipeline.store.FeatureStore`). Returns the predictions table, one row per pair and
    keypoint: pair_id, kp_index, x, y (original target pixels), score, reliable, visible.
    Keypoints without finite source coordinates get NaN x, y, score and reliable=False."""
    conf = check_conf(conf)
    missing = sorted(set(pairs["source_id"]).union(pairs["target_id"]) - set(store.image_ids))
    if missing:
        raise KeyError(f"{store.path}: no features for {len(missing)} images of the pair table, e.g. {missing[:3]}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # one core for the store's reader thread: oversubscribed it is ~4x slower
    try:
        return _match_pairs(store, pairs, conf)
    finally:
        torch.set_num_threads(threads)


def _match_pairs(store, pairs: pd.DataFrame, conf: dict) -> pd.DataFrame:
    kp = _KeypointIndex(pairs)
    desc = _source_descriptors(store, kp)
    pred_xy = np.full((kp.total, 2), np.nan)
    scores = np.full(kp.total, np.nan, dtype=np.float32)
    trg_desc = torch.empty((kp.total, desc.shape[1]) if conf["mutual"] else (0, 0))
    maps = _FloatMaps()
    for target_id, rows, feats16 in _maps_with_rows(store, kp, "target_id"):
        cells, peak = match_keypoints(
            desc[rows][None], maps(feats16), conf["method"], int(conf["window"]), float(conf["temperature"]),
            bool(conf["zero_outside"]), int(conf["upsample"]),
        )
        pred_xy[rows] = store.transform(target_id).cells_to_pixels(cells[0].double()).numpy()
        scores[rows] = peak[0].numpy()
        if conf["mutual"]:
            trg_desc[rows] = sample_map(feats16, cells[0])
    reliable = kp.finite.copy()
    if conf["mutual"]:
        for source_id, rows, feats16 in _maps_with_rows(store, kp, "source_id"):
            src_cells = torch.from_numpy(store.transform(source_id).pixels_to_cells(kp.source_xy[rows]))
            reliable[rows] = mutual_nearest(trg_desc[rows], maps(feats16), src_cells).numpy()
    return pd.DataFrame({
        "pair_id": kp.pair_ids,
        "kp_index": kp.kp_index,
        "x": pred_xy[:, 0],
        "y": pred_xy[:, 1],
        "score": scores,
        "reliable": reliable,
        "visible": kp.visible,
    })


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


def _source_descriptors(store, kp: _KeypointIndex) -> torch.Tensor:
    """Pass 1: ``[K, C]`` float32 descriptors of every keypoint, each source image read once
    and only the 4 neighbour cells of each keypoint converted from float16."""
    desc = torch.zeros((kp.total, store.attrs["feat_dim"]), dtype=torch.float32)
    for source_id, rows, feats16 in _maps_with_rows(store, kp, "source_id"):
        g = store.transform(source_id).pixels_to_cells(kp.source_xy[rows])
        desc[rows] = sample_map(feats16, g)
    return desc


def _maps_with_rows(store, kp: _KeypointIndex, column: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(image id, keypoint rows with finite source coords, [C, h, w] float16 map)`` for every
    image of ``column`` (source_id or target_id) with such rows, read in bulk in storage order.
    The map is only valid until the next item."""
    groups = kp.groups(column)
    wanted = {}
    for image_id, positions in groups.items():
        rows = kp.rows_of(positions)
        rows = rows[kp.finite[rows]]
        if len(rows):
            wanted[store.index(image_id)] = (image_id, rows)
    for n, feats16 in store.iter_maps(wanted):
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
