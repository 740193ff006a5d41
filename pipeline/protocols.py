"""Evaluation protocols: how predictions become PCK, as small declarative records.

Published semantic-correspondence numbers differ partly because their protocols do;
`PRESETS` holds the standard ones, and `evaluate_protocols` scores the same predictions
under each, with bootstrap intervals (`pipeline.bootstrap`). A protocol fixes:

normaliser   ``native`` (the dataset's own, in the pair table), ``bbox`` (max side of the
             target bounding box), ``image`` (max side of the target image) or ``kpts``
             (max side of the bounding box of the target's visible keypoints);
frame        ``original`` (distances in original target pixels) or ``squash``
             (distances after resizing the target image to ``frame_size`` x
             ``frame_size``, anisotropically, as the seed study measured them; the
             normaliser is measured in the same frame);
aggregation  ``image`` (mean over pairs of the fraction correct), ``point`` (keypoints
             pooled) or ``category`` (mean over categories of their per-image PCK);
threshold    ``<=`` or ``<`` (correct when distance <= / < alpha x normaliser);
directions   ``forward`` (source -> target) and optionally ``backward`` (target ->
             source: the pairs' reverse predictions, as some works also transfer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from semcorr.pipeline.bootstrap import interval, pck_statistic, point_weights
from semcorr.pipeline.coords import resized_points
from semcorr.pipeline.tables import keypoints

NORMALISERS = ("native", "bbox", "image", "kpts")
FRAMES = ("original", "squash")
AGGREGATIONS = ("image", "point", "category")
THRESHOLDS = ("<=", "<")
DIRECTIONS = ("forward", "backward")


class ProtocolError(ValueError):
    """A protocol cannot be applied to these predictions; the message says what is missing."""


@dataclass(frozen=True)
class Protocol:
    name: str
    normaliser: str
    aggregation: str
    frame: str = "original"
    threshold: str = "<="
    directions: tuple[str, ...] = ("forward",)
    frame_size: int | None = None  # squash side in pixels; None: the variant's network input size
    source: str = field(default="", compare=False)  # where the convention comes from

    def __post_init__(self):
        for name, value, allowed in (("normaliser", self.normaliser, NORMALISERS), ("frame", self.frame, FRAMES),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("threshold", self.threshold, THRESHOLDS)):
            if value not in allowed:
                raise ProtocolError(f"protocol {self.name!r}: {name} must be one of {allowed}, got {value!r}")
        if not self.directions or set(self.directions) - set(DIRECTIONS):
            raise ProtocolError(f"protocol {self.name!r}: directions must be a non-empty subset of {DIRECTIONS}")

    def describe(self) -> str:
        frame = "original target pixels" if self.frame == "original" else (
            f"target squashed to {self.frame_size or 'S'} x {self.frame_size or 'S'}")
        return (f"{self.name}: normaliser {self.normaliser}, {frame}, per {self.aggregation}, "
                f"correct if distance {self.threshold} alpha x normaliser, {' + '.join(self.directions)}")


PRESETS: dict[str, Protocol] = {
    protocol.name: protocol for protocol in (
        Protocol("native", "native", "image",
                 source="the dataset's own normaliser (pair table `norm_kind`), original pixels, per image"),
        Protocol("spair", "bbox", "category",
                 source="Min et al. 2019, SPair-71k (arXiv:1908.10543): PCK@alpha x max side of the target "
                        "bounding box, per image, tables average the per-category values"),
        Protocol("pfpascal", "image", "image",
                 source="Ham et al. 2018, Proposal Flow (TPAMI), as WeakAlign, DHPF and CATs evaluate PF-PASCAL: "
                        "alpha x max side of the target image, per image"),
        Protocol("pfwillow", "kpts", "point",
                 source="Ham et al. 2016, Proposal Flow (CVPR): alpha x max side of the bounding box of the target "
                        "keypoints, keypoints pooled"),
        Protocol("seed_study", "native", "image", frame="squash",
                 source="the seed study this project reproduces: distances measured after squashing the target "
                        "image to the network's S x S input"),
    )
}


def preset(name: str) -> Protocol:
    if name not in PRESETS:
        raise ProtocolError(f"unknown protocol {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class Scored:
    """Per-pair results of one protocol: hits ``[P, A]``, visible counts ``[P]``, categories ``[P]``."""

    hits: np.ndarray
    n_visible: np.ndarray
    categories: np.ndarray


def pair_image_sizes(pairs: pd.DataFrame, images: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{"source": [P, 2], "target": [P, 2]}`` (width, height) of each pair's images."""
    table = images.set_index("image_id")[["width", "height"]]
    return {role: table.loc[pairs[f"{role}_id"]].to_numpy(np.float64) for role in ("source", "target")}


def score(protocol: Protocol, pairs: pd.DataFrame, predictions: pd.DataFrame, sizes: dict[str, np.ndarray],
          alphas, input_size: int | None = None, reverse: pd.DataFrame | None = None) -> Scored:
    """Per-pair correct counts under ``protocol`` (backward pairs follow the forward ones).

    pairs: the prepared pair table (P rows); predictions: the predictions table
    (pair_id, kp_index, x, y) of the forward direction, ``reverse`` that of the backward
    one (the source keypoints predicted from the target's); sizes: `pair_image_sizes`;
    input_size: the variant's network input (the squash frame's default side).
    """
    parts = []
    for direction in protocol.directions:
        if direction == "forward":
            parts.append(_score_direction(protocol, pairs, predictions, sizes["target"], "target", alphas, input_size))
            continue
        if reverse is None:
            raise ProtocolError(f"protocol {protocol.name!r} scores target -> source too, and these predictions "
                                "have no reverse direction: set `match.argmax.reverse: true`")
        parts.append(_score_direction(protocol, pairs, reverse, sizes["source"], "source", alphas, input_size))
    hits = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    n_visible = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    categories = np.tile(pairs["category"].to_numpy(), len(parts))
    return Scored(hits, n_visible, categories)


def _score_direction(protocol: Protocol, pairs: pd.DataFrame, predictions: pd.DataFrame, sizes: np.ndarray,
                     role: str, alphas, input_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    pairs = pairs.reset_index(drop=True)
    gt = [keypoints(flat) for flat in pairs[f"{role}_kps"]]
    counts = np.array([len(xy) for xy in gt], dtype=np.int64)
    pair_index = np.repeat(np.arange(len(pairs)), counts)
    kp_index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    table = predictions.set_index(["pair_id", "kp_index"])
    keys = pd.MultiIndex.from_arrays([pairs["pair_id"].to_numpy()[pair_index], kp_index])
    found = keys.isin(table.index)
    if not found.all():
        first = keys[~found][0]
        raise ProtocolError(f"no prediction for pair {first[0]!r} keypoint {first[1]} ({int((~found).sum())} missing)")
    pred = table.loc[keys, ["x", "y"]].to_numpy(np.float64)
    gt_xy = np.concatenate(gt) if len(gt) else np.zeros((0, 2))
    visible = np.concatenate([np.asarray(v, dtype=bool) for v in pairs["visible"]]) if len(gt) else np.zeros(0, bool)
    size_k = sizes[pair_index]
    if protocol.frame == "squash":
        side = protocol.frame_size or input_size
        if not side:
            raise ProtocolError(f"protocol {protocol.name!r}: the squash frame needs a side (frame_size or the "
                                "variant's input size)")
        pred = resized_points(pred, size_k, side)
        gt_xy = resized_points(gt_xy, size_k, side)
    norm = _normaliser(protocol, pairs, gt_xy, visible, pair_index, sizes, role, input_size)
    distance = np.linalg.norm(pred - gt_xy, axis=1)
    alphas = np.asarray([float(a) for a in alphas])
    limit = alphas[None] * norm[pair_index][:, None]
    with np.errstate(invalid="ignore"):  # NaN predictions are never correct
        correct = (distance[:, None] <= limit) if protocol.threshold == "<=" else (distance[:, None] < limit)
    correct &= visible[:, None]
    hits = np.stack([np.bincount(pair_index, weights=correct[:, a], minlength=len(pairs)) for a in range(len(alphas))], 1)
    return hits, np.bincount(pair_index[visible], minlength=len(pairs)).astype(np.float64)


def _normaliser(protocol: Protocol, pairs: pd.DataFrame, gt_xy: np.ndarray, visible: np.ndarray,
                pair_index: np.ndarray, sizes: np.ndarray, role: str, input_size: int | None) -> np.ndarray:
    """``[P]`` normaliser of each pair, in the protocol's frame."""
    kinds = pairs["norm_kind"].to_numpy() if protocol.normaliser == "native" else np.full(len(pairs), protocol.normaliser)
    norm = np.full(len(pairs), np.nan)
    squash = protocol.frame == "squash"
    side = protocol.frame_size or input_size
    for kind in np.unique(kinds):
        rows = kinds == kind
        if kind == "image":
            norm[rows] = side if squash else sizes[rows].max(axis=1)
        elif kind == "kpts":
            norm[rows] = _keypoint_extent(gt_xy, visible, pair_index, len(pairs))[rows]
        elif kind == "bbox":
            norm[rows] = _bbox_norm(protocol, pairs, rows, sizes, role, side if squash else None)
        else:
            raise ProtocolError(f"protocol {protocol.name!r}: unknown normaliser kind {kind!r} in the pair table")
    return norm


def _keypoint_extent(xy: np.ndarray, visible: np.ndarray, pair_index: np.ndarray, n_pairs: int) -> np.ndarray:
    """``[P]`` max side of the bounding box of each pair's visible points (NaN: none visible)."""
    low = np.full((n_pairs, 2), np.inf)
    high = np.full((n_pairs, 2), -np.inf)
    np.minimum.at(low, pair_index[visible], xy[visible])
    np.maximum.at(high, pair_index[visible], xy[visible])
    extent = (high - low).max(axis=1)
    extent[~np.isfinite(extent)] = np.nan
    return extent


def _bbox_norm(protocol: Protocol, pairs: pd.DataFrame, rows: np.ndarray, sizes: np.ndarray, role: str,
               squash_side: int | None) -> np.ndarray:
    column = f"{role}_bbox"
    if column in pairs.columns and pairs.loc[rows, column].notna().all():
        box = np.stack([np.asarray(b, dtype=np.float64) for b in pairs.loc[rows, column]])  # [R, 4] x1 y1 x2 y2
        w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
        if squash_side is not None:
            w, h = w * squash_side / sizes[rows, 0], h * squash_side / sizes[rows, 1]
        return np.maximum(w, h)
    native = pairs["norm_kind"].to_numpy()[rows] == "bbox"
    if role == "target" and squash_side is None and native.all():
        return pairs.loc[rows, "pck_norm"].to_numpy(np.float64)
    raise ProtocolError(f"protocol {protocol.name!r} needs the {role} bounding box"
                        + (" in the squash frame" if squash_side else "")
                        + f", which this pair table lacks (no `{column}` column)")


def evaluate_protocols(protocols: list[Protocol], pairs: pd.DataFrame, predictions: pd.DataFrame,
                       sizes: dict[str, np.ndarray], alphas, weights: np.ndarray, confidence: float,
                       input_size: int | None = None, reverse: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (protocol, alpha): pck, ci_low, ci_high, n_pairs, n_points; ``weights``:
    bootstrap counts ``[B, P]`` (`pipeline.bootstrap.resample_counts`). A protocol that does
    not apply (e.g. a bbox normaliser without boxes) gets a row with ``defined`` False and
    the reason."""
    rows = []
    for protocol in protocols:
        try:
            scored = score(protocol, pairs, predictions, sizes, alphas, input_size, reverse)
        except ProtocolError as exc:
            rows += [{"protocol": protocol.name, "alpha": float(a), "pck": np.nan, "ci_low": np.nan,
                      "ci_high": np.nan, "n_pairs": 0, "n_points": 0, "defined": False, "note": str(exc)}
                     for a in alphas]
            continue
        repeat = len(protocol.directions)
        w = np.tile(weights, (1, repeat))
        value = pck_statistic(protocol.aggregation, scored.hits, scored.n_visible, scored.categories,
                              point_weights(len(scored.hits)))[0]
        low, high = interval(pck_statistic(protocol.aggregation, scored.hits, scored.n_visible, scored.categories, w),
                             confidence)
        for k, alpha in enumerate(alphas):
            rows.append({"protocol": protocol.name, "alpha": float(alpha), "pck": value[k], "ci_low": low[k],
                         "ci_high": high[k], "n_pairs": int((scored.n_visible > 0).sum()),
                         "n_points": int(scored.n_visible.sum()), "defined": True, "note": protocol.describe()})
    return pd.DataFrame(rows)
