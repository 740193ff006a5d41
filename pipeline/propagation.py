"""Video label propagation through feature affinities: the protocol of CRW (Jabri et al. 2020)
and SFC (Hu et al. 2022) that evaluates correspondence features on video.

The rule. Frame 0's labels are given. Each target frame t >= 1 attends to the first frame,
everywhere (the long-term memory), and to the last ``n_context`` frames before it, frames
``max(1, t - n_context) .. t - 1``, each only within ``radius`` cells of the target cell
(Euclidean distance on the feature grid < radius). Of all these affinities (cosine
similarities of the L2-normalised features) a target cell keeps the ``topk`` largest,
weighs them by a softmax at ``temperature`` and takes the weighted sum of their frames'
soft labels: that is frame t's label, context for the frames after it. `default_conf`
holds SFC's published settings for one feature model (its README: ``--topk 10 --videoLen 20
--radius 12 --temperature 0.05``). One difference from the reference code, which pads the
video with ``n_context`` copies of frame 0: a frame is never counted twice, so early target
frames do not see duplicates of frame 0 among their top-k.

Labels live on the feature grid: `mask_to_grid` and `keypoints_to_grid` put frame 0's labels
there, `grid_to_mask` and `grid_to_keypoints` map predictions back to image pixels, all
through the frame's `CellTransform` (`pipeline.coords`).

Compute (`propagate`). The affinities do not depend on the labels, so scoring runs ahead of
the labels: frames stream through a ring of pending target frames, each scored against the
first frame as it arrives (in blocks of target cells), and each step scores ``key_block``
recent key frames at once against every pending target they serve, then finalises the targets
whose context is complete, in order. The windowed affinity of a recent frame is computed per
tile of ``tile x tile`` target cells against the key window that tile can reach, one tile row
at a time, so nothing dense is ever formed for recent frames. The top-k of a target cell is
chosen in two stages that give exactly the k largest scores: the scores are cut into groups of
GROUP keys, the k groups with the largest maxima must hold the k largest scores, and only those
groups' scores meet the cell's running top-k. Memory is a few dozen frames of features
whatever the sequence length. The top-k are chosen with int8 scores of the L2-normalised
features (a target cell quantised with its own scale, which ranks nothing; a key frame with
one scale, so its scores rank as the exact int32 dot products, on any device), then weighed
with float32 cosine similarities recomputed from the stored features for the kept cells:
int8 only decides near-ties of the top-k (``select: float32`` chooses in float32 instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import torch

from semcorr.pipeline.coords import CellTransform, sample_cells

default_conf = {
    "n_context": 20,  # recent frames a target frame attends to, besides the first frame
    "radius": 12.0,  # cells: keys of a recent frame lie closer than this to the target cell
    "topk": 10,  # affinities kept per target cell
    "temperature": 0.05,  # softmax temperature over the kept affinities
    "select": "int8",  # scores that choose the top-k: int8 or float32 (weights are float32 either way)
    "tile": 6,  # target cells per tile side, the unit of the windowed affinity (6: the fastest on CPU at 60x107)
    "key_block": 8,  # recent key frames scored per step (their scores of one tile row are held at once)
    "block": 2048,  # target cells per block of the first-frame affinity (bounds its memory)
    "device": "cpu",
}
OUTSIDE = -(2 ** 30)  # int8 scores of keys beyond the radius or the grid (real ones are > -2^24)
GATHER = 256  # target cells per gather of their kept keys' features (a block that stays in cache)
GROUP = 16  # window keys per group of the top-k pre-selection (16 int32 scores: one 64-byte line)
KEYPOINT_SIGMA = 0.5  # cells: Gaussian of a joint on the grid (CRW's JHMDB heatmaps)
KEYPOINT_WINDOW = 1  # cells: a joint's prediction is its heatmap's soft-argmax in this window around the peak


def check_conf(conf: dict | None) -> dict:
    conf = {**default_conf, **(conf or {})}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise ValueError(f"unknown propagation settings {sorted(unknown)}; known: {sorted(default_conf)}")
    if conf["select"] not in ("int8", "float32"):
        raise ValueError(f"propagation select {conf['select']!r}: expected int8 or float32")
    for key in ("n_context", "topk", "tile", "key_block", "block"):
        if int(conf[key]) < 1:
            raise ValueError(f"propagation {key} must be >= 1, got {conf[key]}")
    if not conf["radius"] > 0 or not conf["temperature"] > 0:
        raise ValueError("propagation radius and temperature must be > 0")
    return conf


# -- labels on the grid ------------------------------------------------------------------


def _pixel_centres(height: int, width: int) -> np.ndarray:
    """``[H * W, 2]`` (x, y) of every pixel centre, row-major."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float64)


def mask_to_grid(labels: np.ndarray, n_labels: int, transform: CellTransform) -> torch.Tensor:
    """``labels: [H, W]`` label map (values >= ``n_labels`` count as background, like void)
    -> ``[n_labels, h, w]`` soft labels: each cell's share of the pixels whose centre it holds
    (a cell holding no pixel centre takes the label of the pixel nearest its centre)."""
    labels = np.where(np.asarray(labels) < n_labels, labels, 0).astype(np.int64)
    h, w = transform.grid_h, transform.grid_w
    cells = transform.nearest_cell(_pixel_centres(*labels.shape))
    flat = cells[:, 1] * w + cells[:, 0]
    counts = np.bincount(flat * n_labels + labels.ravel(), minlength=h * w * n_labels).reshape(h * w, n_labels)
    empty = counts.sum(1) == 0
    if empty.any():
        centres = np.stack(np.divmod(np.flatnonzero(empty), w)[::-1], axis=1).astype(np.float64)
        xy = np.rint(transform.cells_to_pixels(centres)).astype(np.int64)
        xy = np.clip(xy, 0, [labels.shape[1] - 1, labels.shape[0] - 1])
        counts[empty, labels[xy[:, 1], xy[:, 0]]] = 1
    soft = counts / counts.sum(1, keepdims=True)
    return torch.from_numpy(soft.T.reshape(n_labels, h, w)).float()


def grid_to_mask(soft: torch.Tensor, transform: CellTransform) -> np.ndarray:
    """``soft: [K, h, w]`` -> ``[H, W]`` uint8 label map of the original image: the soft
    labels sampled bilinearly at each pixel centre, then the most likely label."""
    sampled = sample_cells(soft[None].float(), _pixel_cells(transform))[0]  # [H * W, K]
    # max, not argmax: the same first index of the largest, far faster over a short dimension
    return sampled.max(1).indices.to(torch.uint8).numpy().reshape(transform.image_h, transform.image_w)


@lru_cache(maxsize=8)
def _pixel_cells(transform: CellTransform) -> torch.Tensor:
    """``[1, H * W, 2]`` cell coords of every pixel centre (one sequence's frames share them)."""
    centres = torch.from_numpy(_pixel_centres(transform.image_h, transform.image_w)).float()
    return transform.pixels_to_cells(centres)[None]


def keypoints_to_grid(xy: np.ndarray, visible: np.ndarray, transform: CellTransform,
                      sigma: float = KEYPOINT_SIGMA) -> torch.Tensor:
    """``xy: [J, 2]`` pixels -> ``[J, h, w]`` heatmaps: a Gaussian of ``sigma`` cells on each
    visible joint, cut at 3 sigma (all zero for an invisible joint or one off the grid)."""
    h, w = transform.grid_h, transform.grid_w
    g = transform.pixels_to_cells(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    gy, gx = np.mgrid[:h, :w]
    d2 = (gx[None] - g[:, 0, None, None]) ** 2 + (gy[None] - g[:, 1, None, None]) ** 2
    heat = np.exp(-d2 / (2 * sigma ** 2)) * (d2 <= (3 * sigma) ** 2)
    heat[~(np.asarray(visible, dtype=bool) & np.isfinite(g).all(1))] = 0
    return torch.from_numpy(heat).float()


def grid_to_keypoints(heat: torch.Tensor, transform: CellTransform,
                      window: int = KEYPOINT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """``heat: [J, h, w]`` -> (``[J, 2]`` pixels, ``[J]`` tracked): each heatmap's soft-argmax
    within ``window`` cells of its argmax cell (0: the argmax), mapped to pixels; a joint whose
    heatmap is all zero is not tracked (its position is NaN)."""
    heat = heat.double()
    n_joints, h, w = heat.shape
    peak = heat.flatten(1).argmax(1)
    centre = torch.stack([peak % w, peak // w], dim=1)  # [J, 2] (j, i)
    offsets = torch.arange(-window, window + 1)
    dj, di = torch.meshgrid(offsets, offsets, indexing="xy")
    cells = centre[:, None] + torch.stack([dj.flatten(), di.flatten()], dim=1)[None]  # [J, K, 2]
    inside = (cells[..., 0] >= 0) & (cells[..., 0] < w) & (cells[..., 1] >= 0) & (cells[..., 1] < h)
    cells = torch.stack([cells[..., 0].clamp(0, w - 1), cells[..., 1].clamp(0, h - 1)], dim=-1)
    values = heat[torch.arange(n_joints)[:, None], cells[..., 1], cells[..., 0]] * inside
    total = values.sum(1, keepdim=True)
    tracked = (heat.flatten(1).sum(1) > 0).numpy()
    mean = (cells.double() * values[..., None]).sum(1) / total.clamp_min(1e-300)
    xy = transform.cells_to_pixels(mean.numpy())
    xy[~tracked] = np.nan
    return xy, tracked


# -- the rule -------------------------------------------------------------------------------


def propagate(get_feats: Callable[[int], torch.Tensor], n_frames: int, labels: torch.Tensor,
              conf: dict | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Propagate frame 0's ``labels: [K, h, w]`` through a video of ``n_frames`` frames whose
    ``get_feats(t) -> [C, h, w]`` (called once per frame, in order) share one grid.

    Yields ``(t, [K, h, w])`` for t = 1 .. n_frames - 1, in order.
    """
    conf = check_conf(conf)
    if n_frames < 2:
        return
    run = _Run(conf, get_feats, n_frames, labels)
    yield from run()


class _Run:
    """One sequence through the rule (see the module docstring). Frame features are kept as
    stored (float16) with their norms, plus int8 codes for the frames still to be scored."""

    def __init__(self, conf: dict, get_feats, n_frames: int, labels: torch.Tensor):
        self.conf, self.get_feats, self.n_frames = conf, get_feats, n_frames
        self.device = torch.device(conf["device"])
        self.k, self.tau = int(conf["topk"]), float(conf["temperature"])
        self.n_ctx = int(conf["n_context"])
        last = n_frames - 1
        self.key_block = max(1, min(int(conf["key_block"]), last - 1))  # recent key frames scored per step
        self.span = max(1, min(self.n_ctx, last - 1))  # targets one recent key frame serves
        self.ring = min(self.key_block + self.n_ctx - 1, last)  # pending target frames
        first = get_feats(0)
        c, h, w = first.shape
        if tuple(labels.shape[1:]) != (h, w):
            raise ValueError(f"labels are {tuple(labels.shape[1:])} cells, the features {h}x{w}")
        self.c, self.h, self.w, self.n = c, h, w, h * w
        self.int8 = conf["select"] == "int8"
        self.qmax = min(127, int(math.sqrt((2 ** 24 - 1) / c)))  # int8 sums stay exact in float32 too
        self._layout(float(conf["radius"]), int(conf["tile"]))
        # recent frames whose features / labels are kept: from the oldest key of a pending target to the newest target
        self.slots = min(2 * self.n_ctx + self.key_block - 1, last)
        self.feats16 = torch.zeros(self.slots + 1, self.n, c, dtype=torch.float16, device=self.device)
        self.norms = torch.ones(self.slots + 1, self.n, device=self.device)
        self.labels = torch.zeros(self.slots + 1, self.n, labels.shape[0], device=self.device)
        self.labels[0] = labels.to(self.device).flatten(1).T.float()
        self.codes: dict[int, tuple[torch.Tensor, float]] = {}  # frame -> its key codes [N, C] and their scale
        code_type = torch.int8 if self.int8 else torch.float32
        # the pending targets' query codes per tile; the first span - 1 slots repeat after the last, so the
        # targets of one key frame are always consecutive slots
        self.queries = torch.zeros(self.n_tiles, self.ring + self.span - 1, self.t2, c, dtype=code_type,
                                   device=self.device)
        self.best = torch.full((self.ring, self.n_tiles, self.t2, self.k), -math.inf, device=self.device)
        self.best_ids = torch.zeros(self.ring, self.n_tiles, self.t2, self.k, dtype=torch.long, device=self.device)
        # work buffers, reused by every step: the key frames' padded maps (zero past the grid), one key's
        # windows of a tile row (zero past the window), the scores of a tile row and of a first-frame block
        self._pads = torch.zeros(self.key_block, self.th * self.tile + 2 * self.m, self.tw * self.tile + 2 * self.m, c,
                                 dtype=code_type, device=self.device)  # cell-major: windows copy in whole cells
        self._windows = torch.zeros(self.tw, self.win2, c, dtype=code_type, device=self.device)
        score_type = torch.int32 if self.int8 else torch.float32
        self._scores = torch.empty(self.key_block, self.tw, self.span, self.t2, self.win2, dtype=score_type,
                                   device=self.device)
        n_rows, n_groups = self.tw * self.ring * self.t2, self.win2 // GROUP  # rows: (tile, target, query)
        kg = min(self.k, self.key_block * n_groups)
        self._maxima = torch.empty(n_rows * self.key_block * n_groups, device=self.device)  # of each window group
        self._picked = torch.empty(n_rows * kg, GROUP, dtype=score_type, device=self.device)  # chosen groups' scores
        self._candidates = torch.empty(n_rows * (self.k + kg * GROUP), device=self.device)  # of each row
        self._x = torch.empty(self.n, c, device=self.device)  # a frame's normalised features
        self._y = torch.empty(self.n, c, device=self.device)  # its key codes before rounding
        columns = -(-self.n // GROUP) * GROUP  # the first frame's cells, padded to whole groups
        self._first = torch.empty(min(int(conf["block"]), self.n), columns, dtype=score_type, device=self.device)
        self._load(0, first)
        key, self.first_scale = self.codes.pop(0)
        self.first_key = torch.zeros(c, columns, dtype=code_type, device=self.device)
        self.first_key[:, :self.n] = key.T

    # -- layout of tiles and windows --------------------------------------------------------
    def _layout(self, radius: float, tile: int) -> None:
        h, w = self.h, self.w
        m = min(max(0, math.ceil(radius) - 1), max(h, w) - 1)  # largest useful offset with distance < radius
        self.tile, self.m, self.win = tile, m, tile + 2 * m
        self.win2 = -(-self.win ** 2 // GROUP) * GROUP  # window keys, padded to whole groups
        self.th, self.tw = -(-h // tile), -(-w // tile)
        self.n_tiles, self.t2 = self.th * self.tw, tile * tile
        ti, tj = np.divmod(np.arange(self.n_tiles), self.tw)
        pi, pj = np.divmod(np.arange(self.t2), tile)
        qi = ti[:, None] * tile + pi[None]  # [tiles, T^2] query rows
        qj = tj[:, None] * tile + pj[None]
        wi, wj = np.divmod(np.arange(self.win2), self.win)  # rows past the window: padding
        ki = ti[:, None] * tile - m + wi[None]  # [tiles, W^2] key rows
        kj = tj[:, None] * tile - m + wj[None]
        key_in = (wi[None] < self.win) & (ki >= 0) & (ki < h) & (kj >= 0) & (kj < w)
        near = ((ki[:, None] - qi[:, :, None]) ** 2 + (kj[:, None] - qj[:, :, None]) ** 2) < radius ** 2
        valid = torch.from_numpy(near & key_in[:, None]).to(self.device)  # [tiles, T^2, W^2]
        self.bias = torch.zeros(valid.shape, dtype=torch.int32 if self.int8 else torch.float32, device=self.device)
        self.bias[~valid] = OUTSIDE if self.int8 else -math.inf
        self.key_cell = torch.from_numpy(np.where(key_in, ki * w + kj, 0)).to(self.device)
        q_in = (qi < h) & (qj < w)
        position = np.full(h * w, -1)
        position[(qi * w + qj)[q_in]] = np.flatnonzero(q_in.ravel())
        self.position = torch.from_numpy(position).to(self.device)  # tile-order position of each cell

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` per cell -> ``[tiles, T^2, D]`` (cells past the grid are zero)."""
        pad = x.new_zeros(self.th * self.tile, self.tw * self.tile, x.shape[1])
        pad[:self.h, :self.w] = x.view(self.h, self.w, -1)
        t = self.tile
        return pad.view(self.th, t, self.tw, t, -1).permute(0, 2, 1, 3, 4).reshape(self.n_tiles, self.t2, -1)

    def _values(self, scores: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """Scores as comparable float32 affinities (keys beyond the radius: -inf)."""
        if not self.int8:
            return scores
        return torch.where(scores > OUTSIDE // 2, scores * scale, -math.inf)

    # -- frames -----------------------------------------------------------------------------
    def _slot(self, frame: int | torch.Tensor) -> int | torch.Tensor:
        """The feature / label slot of a frame (or of each of a tensor of frames): 0 for frame 0."""
        return (frame != 0) * (1 + (frame - 1) % self.slots)

    def _load(self, frame: int, feats: torch.Tensor) -> torch.Tensor:
        """Keep frame ``frame``'s features and key codes; returns its query codes ``[N, C]``."""
        if tuple(feats.shape) != (self.c, self.h, self.w):
            raise ValueError(f"frame {frame}: features are {tuple(feats.shape)}, frame 0's "
                             f"{(self.c, self.h, self.w)} (a sequence shares one grid)")
        slot = self._slot(frame)
        x = self._x.copy_(feats.to(self.device, torch.float16).flatten(1).T)  # [N, C], as stored (float16)
        self.feats16[slot] = x  # exact: the values are float16
        norm = x.norm(dim=1).clamp_min(1e-12)
        self.norms[slot] = norm
        x.div_(norm[:, None])
        if not self.int8:
            self.codes[frame] = (x.clone(), 1.0)
            return self.codes[frame][0]
        # as a query, each cell its own scale (it scales all the cell's scores alike, so it ranks nothing);
        # as keys, one scale: their scores rank as the exact int32 products
        cell = torch.maximum(x.amax(1, keepdim=True), -x.amin(1, keepdim=True)).clamp_min(1e-12) / self.qmax
        key = float(cell.max())
        if frame < self.n_frames - 1:  # the last frame is no key
            self.codes[frame] = (torch.div(x, key, out=self._y).round_().to(torch.int8), key)
        return x.div_(cell).round_().to(torch.int8)

    def _enqueue(self, t: int) -> None:
        """Load target frame ``t`` into its ring slot and score it against the first frame."""
        code = self._load(t, self.get_feats(t))
        r = (t - 1) % self.ring
        self.queries[:, r] = self._tiles(code)
        if r < self.span - 1:
            self.queries[:, r + self.ring] = self.queries[:, r]
        k = min(self.k, self.n)
        best = torch.full((self.n, self.k), -math.inf, device=self.device)
        ids = torch.zeros(self.n, self.k, dtype=torch.long, device=self.device)
        for start in range(0, self.n, len(self._first)):
            rows = slice(start, min(start + len(self._first), self.n))
            scores = _mm(code[rows], self.first_key, self._first[:rows.stop - start])
            scores[:, self.n:] = OUTSIDE if self.int8 else -math.inf  # the padding
            top, ids[rows, :k] = _group_topk(scores, k)
            best[rows, :k] = top * self.first_scale  # frame 0: ids are its cells
        self.best[r] = -math.inf
        self.best[r].view(-1, self.k)[self.position] = best
        self.best_ids[r].view(-1, self.k)[self.position] = ids

    def _score_block(self, keys: range) -> None:
        """Score recent key frames ``keys`` against every pending target they serve, within the
        radius, and merge their affinities into the targets' top-k. Per tile row: each key's
        scores of its targets; per target cell, the groups of GROUP window keys with the k
        largest maxima hold its k largest scores, so only those groups' scores meet the top-k."""
        last, c, g, k = self.n_frames - 1, self.c, GROUP, self.k
        s0, n_keys, n_groups = keys[0], len(keys), self.win2 // GROUP
        n_t = min(keys[-1] + self.n_ctx, last) - s0  # targets s0 + 1 + i, i < n_t
        slots = torch.tensor([(s0 + i) % self.ring for i in range(n_t)], device=self.device)
        scales = torch.ones(n_keys, device=self.device)
        for p, s in enumerate(keys):
            key, scales[p] = self.codes.pop(s)
            self._pads[p, self.m:self.m + self.h, self.m:self.m + self.w] = key.view(self.h, self.w, c)
        windows = self._windows[:, :self.win ** 2].view(self.tw, self.win, self.win, c)
        scores = self._scores[:n_keys]
        # per row of a tile row's selection (tile j, target i, query q), its place in `scores`
        j_of, i_of, q_of = (x.reshape(-1, 1) for x in torch.meshgrid(
            torch.arange(self.tw), torch.arange(n_t), torch.arange(self.t2), indexing="ij"))
        for row in range(self.th):
            tiles = slice(row * self.tw, (row + 1) * self.tw)
            maxima = self._maxima[:self.tw * n_t * self.t2 * n_keys * n_groups]
            maxima = maxima.view(self.tw, n_t, self.t2, n_keys, n_groups).fill_(-math.inf)
            for p, s in enumerate(keys):
                n_v = min(s + self.n_ctx, last) - s  # its targets: s + 1 .. s + n_v, i.e. i = p .. p + n_v - 1
                a = s % self.ring  # the slot of target s + 1
                band = self._pads[p, row * self.tile: row * self.tile + self.win]  # [W, tw*T + 2m, C]
                windows.copy_(band.unfold(1, self.win, self.tile).permute(1, 0, 3, 2))  # [tw, W, W, C]
                out = scores[p, :, :n_v]  # [tw, n_v, T^2, W^2]
                for j in range(self.tw):
                    _mm(self.queries[row * self.tw + j, a:a + n_v].reshape(-1, c), self._windows[j].T,
                        out[j].view(-1, self.win2))
                out += self.bias[tiles][:, None]
                top = out.view(self.tw, n_v, self.t2, n_groups, g).amax(4)
                maxima[:, p:p + n_v, :, p] = self._values(top, scales[p])
            rows = maxima.view(-1, n_keys * n_groups)
            n_rows, kg = rows.shape[0], min(k, rows.shape[1])
            group_top, pick = rows.topk(kg, dim=1, sorted=False)
            p_of, group = pick // n_groups, pick % n_groups
            r_of = (i_of - p_of).clamp(0, self.span - 1)  # a group never chosen (-inf) still needs a real place
            flat = (((p_of * self.tw + j_of) * self.span + r_of) * self.t2 + q_of) * n_groups + group
            picked = torch.index_select(scores.view(-1, g), 0, flat.view(-1), out=self._picked[:n_rows * kg])
            picked = picked.view(n_rows, kg, g)
            # candidates of a row: its k held affinities, then its chosen groups' scores as affinities
            candidates = self._candidates[:n_rows * (k + kg * g)].view(n_rows, k + kg * g)
            candidates[:, :k] = self.best[slots, tiles].transpose(0, 1).reshape(-1, k)
            new = candidates[:, k:].view(n_rows, kg, g)
            torch.mul(picked, scales[p_of][..., None], out=new)
            if self.int8:
                new.masked_fill_(picked <= OUTSIDE // 2, -math.inf)
            new.masked_fill_(~torch.isfinite(group_top)[..., None], -math.inf)
            top, chosen = candidates.topk(k, dim=1, sorted=False)
            which, offset = (chosen - k).clamp_min(0).div(g, rounding_mode="floor"), (chosen - k) % g
            cells = self.key_cell[tiles][j_of, torch.gather(group, 1, which) * g + offset]
            ids = cells + (torch.gather(p_of, 1, which) + s0) * self.n
            held_ids = self.best_ids[slots, tiles].transpose(0, 1).reshape(-1, k)
            top_ids = torch.where(chosen < k, torch.gather(held_ids, 1, chosen.clamp_max(k - 1)), ids)
            shape = (self.tw, n_t, self.t2, k)
            self.best[slots, tiles] = top.view(shape).transpose(0, 1)
            self.best_ids[slots, tiles] = top_ids.view(shape).transpose(0, 1)

    def _finalise(self, t: int) -> torch.Tensor:
        """Frame ``t``'s labels from its kept affinities, weighed in float32: kept as context,
        returned as ``[K, h, w]`` on the CPU."""
        r = (t - 1) % self.ring
        ids = self.best_ids[r].view(-1, self.k)[self.position]
        kept = torch.isfinite(self.best[r].view(-1, self.k)[self.position])
        frames, cells = ids // self.n, ids % self.n
        slots = self._slot(frames)  # [N, k]
        rows = slots * self.n + cells
        q = self.feats16[self._slot(t)]
        cosine = torch.empty(self.n, self.k, device=self.device)
        for start in range(0, self.n, GATHER):
            part = slice(start, min(start + GATHER, self.n))
            keys = torch.index_select(self.feats16.view(-1, self.c), 0, rows[part].flatten())  # row copies
            keys = keys.float().view(-1, self.k, self.c)
            cosine[part] = torch.einsum("nc,nkc->nk", q[part].float(), keys)
        cosine /= self.norms[self._slot(t), :, None] * self.norms.view(-1)[rows]
        weights = torch.softmax(cosine.masked_fill(~kept, -math.inf) / self.tau, dim=1)
        out = (self.labels.view(-1, self.labels.shape[2])[rows] * weights[..., None]).sum(1)
        self.labels[self._slot(t)] = out
        return out.T.reshape(-1, self.h, self.w).cpu()

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]]:
        last = self.n_frames - 1
        self._enqueue(1)  # frame 1's only context is the first frame
        yield 1, self._finalise(1)
        loaded, s0 = 1, 1
        while s0 < last:  # key frames s0 .. s1 - 1 serve targets up to s1 - 1 + n_context; then s0 + 1 .. s1 are final
            keys = range(s0, min(s0 + self.key_block, last))
            for t in range(loaded + 1, min(keys[-1] + self.n_ctx, last) + 1):
                self._enqueue(t)
                loaded = t
            self._score_block(keys)
            for t in range(s0 + 1, keys[-1] + 2):
                yield t, self._finalise(t)
            s0 = keys[-1] + 1


def _group_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``scores: [R, L]`` (L a multiple of GROUP), unordered,
    with their columns: the k groups of GROUP columns with the largest maxima hold them."""
    rows, length = scores.shape
    groups = scores.view(rows, length // GROUP, GROUP)
    pick = groups.amax(2).topk(min(k, length // GROUP), dim=1, sorted=False).indices  # [R, kg]
    held = torch.gather(groups, 1, pick[..., None].expand(-1, -1, GROUP))  # [R, kg, GROUP]
    top, where = held.view(rows, -1).topk(k, dim=1, sorted=False)
    return top, torch.gather(pick, 1, where // GROUP) * GROUP + where % GROUP


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` into ``out``; int8 operands give their exact int32 products (through float32
    off the CPU, exact while ``C * qmax^2 < 2^24``)."""
    if a.dtype != torch.int8:
        return torch.mm(a, b, out=out)
    if a.device.type == "cpu":
        return torch._int_mm(a, b, out=out)
    return out.copy_(a.float() @ b.float())
