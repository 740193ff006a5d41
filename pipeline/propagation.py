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

Compute (`propagate`). The affinities do not depend on the labels, so one key frame serves
all the target frames that attend to it at once: frames stream through a ring of the
``n_context`` pending target frames; each step scores every pending target against one key
frame, keeps a running top-k per target cell, and finalises the oldest target. The windowed
affinity of a recent frame is computed per tile of ``tile x tile`` target cells against the
key window that tile can reach, so nothing dense is ever formed for recent frames, and the
first frame is scored in blocks of target cells. Memory is a few dozen frames of features
whatever the sequence length. The top-k are chosen with int8 scores of the L2-normalised
features (a target cell quantised with its own scale, which ranks nothing; a key frame with
one scale, so its scores rank as the exact int32 dot products, on any device), then weighed
with float32 cosine similarities recomputed from the stored features for the kept cells:
int8 only decides near-ties of the top-k (``select: float32`` chooses in float32 instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from semcorr.pipeline.coords import CellTransform, sample_cells

default_conf = {
    "n_context": 20,  # recent frames a target frame attends to, besides the first frame
    "radius": 12.0,  # cells: keys of a recent frame lie closer than this to the target cell
    "topk": 10,  # affinities kept per target cell
    "temperature": 0.05,  # softmax temperature over the kept affinities
    "select": "int8",  # scores that choose the top-k: int8 or float32 (weights are float32 either way)
    "tile": 8,  # target cells per tile side, the unit of the windowed affinity (8: the fastest on CPU at 60x107)
    "block": 2048,  # target cells per block of the first-frame affinity (bounds its memory)
    "device": "cpu",
}
OUTSIDE = -(2 ** 30)  # int8 scores of keys beyond the radius or the grid (real ones are > -2^24)
KEYPOINT_SIGMA = 0.5  # cells: Gaussian of a joint on the grid (CRW's JHMDB heatmaps)
KEYPOINT_WINDOW = 1  # cells: a joint's prediction is its heatmap's soft-argmax in this window around the peak


def check_conf(conf: dict | None) -> dict:
    conf = {**default_conf, **(conf or {})}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise ValueError(f"unknown propagation settings {sorted(unknown)}; known: {sorted(default_conf)}")
    if conf["select"] not in ("int8", "float32"):
        raise ValueError(f"propagation select {conf['select']!r}: expected int8 or float32")
    for key in ("n_context", "topk", "tile", "block"):
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
    g = transform.pixels_to_cells(torch.from_numpy(_pixel_centres(transform.image_h, transform.image_w)).float())
    sampled = sample_cells(soft[None].float(), g[None])[0]  # [H * W, K]
    return sampled.argmax(1).to(torch.uint8).numpy().reshape(transform.image_h, transform.image_w)


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
        self.ring = min(self.n_ctx, n_frames - 1)  # pending target frames
        first = get_feats(0)
        c, h, w = first.shape
        if tuple(labels.shape[1:]) != (h, w):
            raise ValueError(f"labels are {tuple(labels.shape[1:])} cells, the features {h}x{w}")
        self.c, self.h, self.w, self.n = c, h, w, h * w
        self.int8 = conf["select"] == "int8"
        self.qmax = min(127, int(math.sqrt((2 ** 24 - 1) / c)))  # int8 sums stay exact in float32 too
        self._layout(float(conf["radius"]), int(conf["tile"]))
        self.slots = self.n_ctx + self.ring + 1  # recent frames whose features / labels are kept
        self.feats16 = torch.zeros(self.slots + 1, self.n, c, dtype=torch.float16, device=self.device)
        self.norms = torch.ones(self.slots + 1, self.n, device=self.device)
        self.labels = torch.zeros(self.slots + 1, self.n, labels.shape[0], device=self.device)
        self.labels[0] = labels.to(self.device).flatten(1).T.float()
        # frame -> (its codes as a query [N, C], as keys [N, C], the keys' scale)
        self.codes: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.queries = torch.zeros(self.n_tiles, self.ring, self.t2, c, device=self.device,
                                   dtype=torch.int8 if self.int8 else torch.float32)
        self.best = torch.full((self.ring, self.n, self.k), -math.inf, device=self.device)
        self.best_ids = torch.zeros(self.ring, self.n, self.k, dtype=torch.long, device=self.device)
        # work buffers, reused by every step: the padded key map (zero past the grid), one tile row's
        # key windows and its scores (int32 or float32)
        code_type = torch.int8 if self.int8 else torch.float32
        self._pad = torch.zeros(c, self.th * self.tile + 2 * self.m, self.tw * self.tile + 2 * self.m,
                                dtype=code_type, device=self.device)  # channel-major: windows copy in runs
        self._windows = torch.empty(self.tw, c, self.win ** 2, dtype=code_type, device=self.device)
        size = max(self.tw * self.ring * self.t2 * self.win ** 2, min(int(conf["block"]), self.n) * self.n)
        self._raw = torch.empty(size, dtype=torch.int32 if self.int8 else torch.float32, device=self.device)
        self._load(0, first)
        _, key, self.first_scale = self.codes.pop(0)
        self.first_key = key.T.contiguous()

    # -- layout of tiles and windows --------------------------------------------------------
    def _layout(self, radius: float, tile: int) -> None:
        h, w = self.h, self.w
        m = min(max(0, math.ceil(radius) - 1), max(h, w) - 1)  # largest useful offset with distance < radius
        self.tile, self.m, self.win = tile, m, tile + 2 * m
        self.th, self.tw = -(-h // tile), -(-w // tile)
        self.n_tiles, self.t2 = self.th * self.tw, tile * tile
        ti, tj = np.divmod(np.arange(self.n_tiles), self.tw)
        pi, pj = np.divmod(np.arange(self.t2), tile)
        qi = ti[:, None] * tile + pi[None]  # [tiles, T^2] query rows
        qj = tj[:, None] * tile + pj[None]
        wi, wj = np.divmod(np.arange(self.win ** 2), self.win)
        ki = ti[:, None] * tile - m + wi[None]  # [tiles, W^2] key rows
        kj = tj[:, None] * tile - m + wj[None]
        key_in = (ki >= 0) & (ki < h) & (kj >= 0) & (kj < w)
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

    # -- frames -----------------------------------------------------------------------------
    def _slot(self, frame: int) -> int:
        return 0 if frame == 0 else 1 + (frame - 1) % self.slots

    def _load(self, frame: int, feats: torch.Tensor) -> None:
        if tuple(feats.shape) != (self.c, self.h, self.w):
            raise ValueError(f"frame {frame}: features are {tuple(feats.shape)}, frame 0's "
                             f"{(self.c, self.h, self.w)} (a sequence shares one grid)")
        slot = self._slot(frame)
        self.feats16[slot] = feats.to(self.device).flatten(1).T  # [N, C], as stored
        x = self.feats16[slot].float()
        norm = x.norm(dim=1).clamp_min(1e-12)
        self.norms[slot] = norm
        x = x / norm[:, None]
        if self.int8:  # as a query, each cell its own scale; as keys, one scale: their scores rank in int32
            cell = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / self.qmax
            key = float(cell.max())
            self.codes[frame] = (torch.round(x / cell).to(torch.int8), torch.round(x / key).to(torch.int8), key)
        else:
            self.codes[frame] = (x, x, 1.0)

    def _enqueue(self, t: int) -> None:
        """Load target frame ``t`` into its ring slot and score it against the first frame."""
        self._load(t, self.get_feats(t))
        code = self.codes[t][0]  # a query's own scale ranks nothing: it scales all its scores alike
        r = (t - 1) % self.ring
        self.queries[:, r] = self._tiles(code)
        k = min(self.k, self.n)
        best = torch.full((self.n, self.k), -math.inf, device=self.device)
        ids = torch.zeros(self.n, self.k, dtype=torch.long, device=self.device)
        block = min(int(self.conf["block"]), self.n)
        raw = self._raw[:block * self.n].view(block, self.n)
        for start in range(0, self.n, block):
            rows = slice(start, min(start + block, self.n))
            top, ids[rows, :k] = _mm(code[rows], self.first_key, raw[:rows.stop - start]).topk(k, dim=1)
            best[rows, :k] = top * self.first_scale  # frame 0: ids are its cells
        self.best[r], self.best_ids[r] = best, ids

    def _score_key(self, s: int, targets: list[int]) -> None:
        """Score the pending ``targets`` against recent frame ``s`` within the radius."""
        _, key, key_scale = self.codes.pop(s)
        self._pad[:, self.m:self.m + self.h, self.m:self.m + self.w] = key.T.reshape(self.c, self.h, self.w)
        slots = sorted((t - 1) % self.ring for t in targets)  # the order of scoring does not matter
        full = len(slots) == self.ring
        queries = self.queries if full else self.queries[:, slots]
        n_t, k, win2 = len(slots), min(self.k, self.win ** 2), self.win ** 2
        rows = n_t * self.t2
        values = torch.empty(self.n_tiles, n_t, self.t2, k, device=self.device)
        cells = torch.empty(self.n_tiles, n_t, self.t2, k, dtype=torch.long, device=self.device)
        raw = self._raw[:self.tw * rows * win2].view(self.tw, rows, win2)
        windows = self._windows.view(self.tw, self.c, self.win, self.win)
        for row in range(self.th):
            tiles = slice(row * self.tw, (row + 1) * self.tw)
            band = self._pad[:, row * self.tile: row * self.tile + self.win]  # [C, W, tw*T + 2m]
            windows.copy_(band.unfold(2, self.win, self.tile).permute(2, 0, 1, 3))  # [tw, C, W, W]
            a = queries[tiles].reshape(self.tw, rows, self.c)
            _bmm(a, self._windows, raw)
            scores = raw.view(self.tw, n_t, self.t2, win2).add_(self.bias[tiles][:, None])
            top, index = scores.topk(k, dim=-1)
            values[tiles] = torch.where(top > OUTSIDE // 2, top * key_scale, -math.inf) if self.int8 else top
            cells[tiles] = torch.gather(self.key_cell[tiles][:, None, None].expand(-1, n_t, self.t2, -1), 3, index)
        order = self.position
        values = values.permute(1, 0, 2, 3).reshape(n_t, -1, k)[:, order]  # [targets, N, k]
        ids = cells.permute(1, 0, 2, 3).reshape(n_t, -1, k)[:, order] + s * self.n
        merged = torch.cat([self.best[slots], values], dim=2)
        top, pick = merged.topk(self.k, dim=2)
        self.best[slots] = top
        self.best_ids[slots] = torch.gather(torch.cat([self.best_ids[slots], ids], dim=2), 2, pick)

    def _finalise(self, t: int) -> torch.Tensor:
        """Frame ``t``'s labels ``[N, K]`` from its kept affinities, weighed in float32."""
        r = (t - 1) % self.ring
        ids, kept = self.best_ids[r], torch.isfinite(self.best[r])
        frames, cells = ids // self.n, ids % self.n
        slots = torch.tensor([self._slot(f) for f in range(t)], device=self.device)[frames]  # [N, k]
        rows = slots * self.n + cells
        q = self.feats16[self._slot(t)]
        cosine = torch.empty(self.n, self.k, device=self.device)
        for start in range(0, self.n, int(self.conf["block"])):  # blocks bound the gathered keys' memory
            part = slice(start, min(start + int(self.conf["block"]), self.n))
            keys = torch.index_select(self.feats16.view(-1, self.c), 0, rows[part].flatten())  # row copies
            keys = keys.float().view(-1, self.k, self.c)
            cosine[part] = torch.einsum("nc,nkc->nk", q[part].float(), keys)
        cosine /= self.norms[self._slot(t), :, None] * self.norms.view(-1)[rows]
        weights = torch.softmax(cosine.masked_fill(~kept, -math.inf) / self.tau, dim=1)
        out = (self.labels.view(-1, self.labels.shape[2])[rows] * weights[..., None]).sum(1)
        self.labels[self._slot(t)] = out
        return out

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]]:
        last = self.n_frames - 1
        for t in range(1, self.ring + 1):
            self._enqueue(t)
        for s in range(0, last):  # after step s (key frame s; frame 0 is scored on enqueue), frame s+1 is final
            if s > 0:
                self._score_key(s, list(range(s + 1, min(s + self.ring, last) + 1)))
            out = self._finalise(s + 1)
            yield s + 1, out.T.reshape(-1, self.h, self.w).cpu()
            if s + 1 + self.ring <= last:
                self._enqueue(s + 1 + self.ring)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` into ``out``; int8 operands give their exact int32 products (through float32
    off the CPU, exact while ``C * qmax^2 < 2^24``)."""
    if a.dtype != torch.int8:
        return torch.mm(a, b, out=out)
    if a.device.type == "cpu":
        return torch._int_mm(a, b, out=out)
    return out.copy_(a.float() @ b.float())


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Batched `_mm` into ``out``: ``a: [B, M, C]``, ``b: [B, C, N]`` -> ``[B, M, N]``."""
    if a.dtype != torch.int8:
        return torch.bmm(a, b, out=out)
    if a.device.type == "cpu":
        for x, y, o in zip(a, b, out):
            torch._int_mm(x, y, out=o)
        return out
    return out.copy_(torch.bmm(a.float(), b.float()))
