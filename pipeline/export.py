"""hloc-compatible HDF5 files: a features file and a matches file.

The layout is the one hloc's readers take (`hloc.utils.io.get_keypoints`,
`hloc.utils.io.get_matches`, `hloc.utils.parsers.names_to_pair`), so hloc's
triangulation and localization pipelines read these files as they are.

Features file: one group per image, named by its image id (a '/' in it makes nested
groups, as in hloc), holding

    keypoints    [N, 2] float32  (x, y) in original pixels, 0-based pixel centres (hloc's
                                 convention too: it maps its resized keypoints back with
                                 ``(k + 0.5) * scale - 0.5``)
    descriptors  [D, N] float32  column n describes keypoint n (hloc's [D, N] order); absent
                                 in a keypoint-transfer export, whose matches are given
    scores       [N] float32     detection score (transfer: 1 for annotated points)
    image_size   [2] int64       (width, height) of the original image

Matches file: one group per ordered pair, named ``names_to_pair(image0, image1)``, holding

    matches0          [N0] int32    index into image1's keypoints of image0's keypoint n; -1: none
    matching_scores0  [N0] float32  the match's similarity; 0 where matches0 is -1

A pair repeating an earlier pair's images (hloc has no name for it) is stored as
``<names_to_pair>#<pair_id>``.

Keypoint transfer (`write_matches_h5`, the match stage's export): each image gets ONE
keypoint set, shared by every pair it is in: its annotated points (the visible keypoints of
every pair it is the source or the target of), then the predicted points that land in it
(the matched predictions of the pairs it is the target of), merged within `MERGE_RADIUS`
pixels (a point joins the first kept point within that distance). ``matches0`` of a pair
indexes into the source's and target's sets; a source keypoint whose prediction is missing
or flagged unreliable has -1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from semcorr.pipeline.io import atomic_path
from semcorr.pipeline.tables import keypoints

MERGE_RADIUS = 0.5  # pixels: transferred points closer than this to a kept point are that point


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key: ``<name0>/<name1>`` with '/' inside the names replaced by '-'."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


@dataclass
class ImageFeatures:
    """One image's group of a features file. keypoints: [N, 2] pixels; scores: [N];
    descriptors: [N, D] (written transposed, as hloc stores them) or None; image_size: (w, h)."""

    keypoints: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]
    descriptors: np.ndarray | None = None


@dataclass
class PairMatches:
    """One pair's group of a matches file. matches0: [N0] int (-1 = none); scores0: [N0]."""

    name0: str
    name1: str
    matches0: np.ndarray
    scores0: np.ndarray
    pair_id: str | None = None


def write_features_h5(path: Path, features: Iterable[tuple[str, ImageFeatures]]) -> Path:
    """Write ``(image name, ImageFeatures)`` items to the features file ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        written: set[str] = set()  # (h5py's `in` costs a lookup in the file)
        with h5py.File(tmp, "w", libver="latest") as f:
            for name, feats in features:
                if name in written:
                    raise ValueError(f"{path}: image {name!r} given twice")
                written.add(name)
                xy = np.asarray(feats.keypoints, dtype=np.float32).reshape(-1, 2)
                scores = np.asarray(feats.scores, dtype=np.float32).reshape(-1)
                if len(scores) != len(xy):
                    raise ValueError(f"{path}: image {name!r} has {len(xy)} keypoints but {len(scores)} scores")
                group = f.create_group(name)
                group["keypoints"] = xy
                group["scores"] = scores
                group["image_size"] = np.asarray(feats.image_size, dtype=np.int64)
                if feats.descriptors is not None:
                    desc = np.asarray(feats.descriptors, dtype=np.float32)
                    if desc.ndim != 2 or len(desc) != len(xy):
                        raise ValueError(f"{path}: image {name!r}: descriptors {desc.shape} for {len(xy)} keypoints")
                    group["descriptors"] = np.ascontiguousarray(desc.T)
    return Path(path)


def write_pair_matches_h5(path: Path, matches: Iterable[PairMatches]) -> Path:
    """Write the pairs' matches to the matches file ``path`` atomically (hloc's layout)."""
    with atomic_path(Path(path)) as tmp:
        written: set[str] = set()
        with h5py.File(tmp, "w", libver="latest") as f:
            for m in matches:
                key = names_to_pair(m.name0, m.name1)
                if key in written:
                    if m.pair_id is None:
                        raise ValueError(f"{path}: pair {m.name0!r}, {m.name1!r} given twice")
                    key = f"{key}#{m.pair_id}"
                written.add(key)
                group = f.create_group(key)
                group["matches0"] = np.asarray(m.matches0, dtype=np.int32)
                group["matching_scores0"] = np.asarray(m.scores0, dtype=np.float32)
    return Path(path)


# -- keypoint transfer ---------------------------------------------------------------------


def merge_points(image: np.ndarray, xy: np.ndarray, radius: float = MERGE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Merge points per image in their order: a point within ``radius`` of a kept point of
    its image is that point (the nearest one), else it is kept.

    image: [M] int image index; xy: [M, 2] -> (index [M] of each point's kept point, counted
    per image from 0 in order of appearance; kept [M] bool, True for the points kept)."""
    image, xy = np.asarray(image, dtype=np.int64), np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    index = np.zeros(len(xy), dtype=np.int64)
    kept = np.zeros(len(xy), dtype=bool)
    if not len(xy):
        return index, kept
    # exact repeats (an annotation in many pairs, argmax cell centres) first, vectorised
    _, first, inverse = np.unique(np.column_stack([image, xy]), axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rows = first[order]
    unique_index = np.empty(len(first), dtype=np.int64)
    cells: dict[tuple[int, int, int], list[tuple[float, float, int]]] = {}  # (image, cx, cy) -> kept (x, y, index)
    counts: dict[int, int] = {}
    points = xy[rows].tolist()
    grid = np.floor(xy[rows] / radius).astype(np.int64).tolist()  # points within radius: in the 3 x 3 cells around
    for u, (img, (x, y), (cx, cy)) in enumerate(zip(image[rows].tolist(), points, grid)):
        best, best_d = -1, radius * radius
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for ox, oy, other in cells.get((img, cx + dx, cy + dy), ()):
                    d = (x - ox) ** 2 + (y - oy) ** 2
                    if d <= best_d:
                        best, best_d = other, d
        if best < 0:
            best = counts.get(img, 0)
            counts[img] = best + 1
            cells.setdefault((img, cx, cy), []).append((x, y, best))
            kept[rows[u]] = True
        unique_index[order[u]] = best
    index[:] = unique_index[inverse.reshape(-1)]
    return index, kept


def transfer_sets(pairs: pd.DataFrame, predictions: pd.DataFrame, where: str = "predictions"
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[PairMatches]]:
    """The keypoint-transfer export in hloc terms: (image id -> (keypoints [N, 2], scores [N]),
    one `PairMatches` per pair, in pair-table order). See the module docstring for the rule."""
    n_pairs = len(pairs)
    order = pd.Index(pairs["pair_id"]).get_indexer(predictions["pair_id"])
    if (order < 0).any():
        raise KeyError(f"{where}: predictions for pair {predictions['pair_id'][order < 0].iloc[0]!r} not in the pair table")
    counts = np.bincount(order, minlength=n_pairs)
    if (counts == 0).any():
        raise KeyError(f"{where}: no predictions for pair {pairs['pair_id'].iloc[int(np.argmin(counts))]!r}")
    names = sorted(set(pairs["source_id"]) | set(pairs["target_id"]))
    number = {name: n for n, name in enumerate(names)}
    src_image = pairs["source_id"].map(number).to_numpy()
    trg_image = pairs["target_id"].map(number).to_numpy()

    # every pair's keypoints, flattened: pair p's keypoint i is row starts[p] + i
    sizes = np.array([len(v) for v in pairs["visible"]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pair_of = np.repeat(np.arange(n_pairs), sizes)
    kp_of = np.arange(starts[-1]) - starts[pair_of]
    visible = np.concatenate([np.asarray(v, dtype=bool) for v in pairs["visible"]]) if n_pairs else np.zeros(0, bool)
    src_xy = np.concatenate([keypoints(v) for v in pairs["source_kps"]]) if n_pairs else np.zeros((0, 2))
    trg_xy = np.concatenate([keypoints(v) for v in pairs["target_kps"]]) if n_pairs else np.zeros((0, 2))

    # candidates in order: per pair, its visible source points, then its visible target points;
    # then per pair (and keypoint), its matched predictions
    vis = np.flatnonzero(visible)
    role = np.r_[np.zeros(len(vis), np.int64), np.ones(len(vis), np.int64)]
    rows = np.r_[vis, vis]
    annotated = np.lexsort((kp_of[rows], role, pair_of[rows]))
    rows, role = rows[annotated], role[annotated]
    pred_row = starts[order] + predictions["kp_index"].to_numpy(np.int64)
    pred_xy = predictions[["x", "y"]].to_numpy(np.float64)
    ok = (np.isfinite(pred_xy).all(axis=1) & predictions["reliable"].to_numpy(bool)
          & (predictions["kp_index"].to_numpy() < sizes[order]))
    ok[ok] = visible[pred_row[ok]]
    moved = np.flatnonzero(ok)
    moved = moved[np.lexsort((predictions["kp_index"].to_numpy()[moved], order[moved]))]
    image = np.r_[np.where(role == 0, src_image[pair_of[rows]], trg_image[pair_of[rows]]), trg_image[order[moved]]]
    xy = np.concatenate([np.where((role == 0)[:, None], src_xy[rows], trg_xy[rows]), pred_xy[moved]])
    score = np.r_[np.ones(len(rows)), predictions["score"].to_numpy(np.float64)[moved]]
    index, kept = merge_points(image, xy)

    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    by_image = np.argsort(image, kind="stable")
    edges = np.searchsorted(image[by_image], np.arange(len(names) + 1))
    for n, name in enumerate(names):
        mine = by_image[edges[n] : edges[n + 1]]
        points = np.zeros((int(kept[mine].sum()), 2))
        points[index[mine[kept[mine]]]] = xy[mine[kept[mine]]]
        scores = np.zeros(len(points))
        np.maximum.at(scores, index[mine], score[mine])  # a merged point keeps its best score
        sets[name] = (points, scores)

    source_point = np.full(len(visible), -1, dtype=np.int64)  # keypoint row -> index in its source's set
    source_point[rows[role == 0]] = index[: len(rows)][role == 0]
    target_point = index[len(rows):]
    pair_of_moved = order[moved]
    bounds = np.searchsorted(pair_of_moved, np.arange(n_pairs + 1))
    moved_scores = score[len(rows):]
    matches = []
    for p, row in enumerate(pairs.itertuples(index=False)):
        m0 = np.full(len(sets[row.source_id][0]), -1, dtype=np.int32)
        s0 = np.zeros(len(m0), dtype=np.float32)
        lo, hi = bounds[p], bounds[p + 1]
        at = source_point[pred_row[moved[lo:hi]]]
        m0[at], s0[at] = target_point[lo:hi], moved_scores[lo:hi]
        matches.append(PairMatches(row.source_id, row.target_id, m0, s0, str(row.pair_id)))
    return sets, matches


def write_matches_h5(path: Path, pairs: pd.DataFrame, predictions: pd.DataFrame, images: pd.DataFrame,
                     features_path: Path) -> Path:
    """The keypoint-transfer export: the predictions table (pair_id, kp_index, x, y, score,
    reliable) of the pairs of ``pairs`` (prepared pair table) as an hloc matches file at
    ``path`` and its features file at ``features_path`` (sizes from ``images``, the images
    table); both written atomically. Returns ``path``."""
    sets, matches = transfer_sets(pairs, predictions, str(path))
    sizes = images.set_index("image_id")[["width", "height"]]
    missing = sorted(set(sets) - set(sizes.index))
    if missing:
        raise KeyError(f"{features_path}: images {missing[:3]} of the pair table are not in the images table")

    def features() -> Iterator[tuple[str, ImageFeatures]]:
        for name, (xy, scores) in sets.items():
            w, h = sizes.loc[name]
            yield name, ImageFeatures(xy, scores, (int(w), int(h)))

    write_features_h5(features_path, features())
    return write_pair_matches_h5(path, matches)
