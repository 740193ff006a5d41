"""Percentage of correct keypoints (PCK@alpha).

A predicted keypoint is correct when its distance to the ground truth is at most
``alpha * pck_norm`` (target pixels). Only visible keypoints count.

per image: the mean over pairs of each pair's fraction of correct visible keypoints;
    pairs with no visible keypoint are left out (and counted in ``n_pairs_no_visible``).
per point: the fraction of correct keypoints over all visible keypoints pooled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from semcorr.pipeline.tables import keypoints

DEFAULT_ALPHAS = (0.01, 0.05, 0.1, 0.15, 0.2)


@dataclass
class PCK:
    image: dict[float, float]  # alpha -> PCK per image (NaN when no pair counts)
    point: dict[float, float]  # alpha -> PCK per point (NaN when no point counts)
    n_pairs: int  # pairs with at least one visible keypoint (the per-image denominator)
    n_points: int  # visible keypoints (the per-point denominator)
    n_pairs_no_visible: int  # pairs left out of per image for having no visible keypoint
    per_pair: np.ndarray = field(repr=False)  # [P, A] fraction correct per pair; NaN rows = no visible


def normalised_errors(pred_xy, gt_xy, norm) -> np.ndarray:
    """pred_xy, gt_xy: [..., 2] pixels; norm: broadcastable to [...] -> distance / norm [...]."""
    pred_xy, gt_xy, norm = (_numpy(v).astype(np.float64) for v in (pred_xy, gt_xy, norm))
    return np.linalg.norm(pred_xy - gt_xy, axis=-1) / norm


def pck_flat(errors, pair_index, visible, n_pairs: int, alphas=DEFAULT_ALPHAS) -> PCK:
    """PCK from one row per keypoint.

    errors: [K] distance / pck_norm (NaN = no prediction, counted wrong if visible);
    pair_index: [K] int in [0, n_pairs); visible: [K] bool.
    """
    errors, pair_index = _numpy(errors).astype(np.float64), _numpy(pair_index).astype(np.int64)
    visible = _numpy(visible).astype(bool)
    alphas = [float(a) for a in alphas]
    correct = (errors[:, None] <= np.asarray(alphas)[None]) & visible[:, None]  # NaN compares False
    n_visible = np.bincount(pair_index[visible], minlength=n_pairs)
    per_pair = np.full((n_pairs, len(alphas)), np.nan)
    hits = np.stack([np.bincount(pair_index, weights=correct[:, a], minlength=n_pairs) for a in range(len(alphas))], 1)
    counted = n_visible > 0
    per_pair[counted] = hits[counted] / n_visible[counted, None]
    n_points = int(visible.sum())
    image = per_pair[counted].mean(0) if counted.any() else np.full(len(alphas), np.nan)
    point = correct[visible].mean(0) if n_points else np.full(len(alphas), np.nan)
    return PCK(
        image=dict(zip(alphas, image.tolist())),
        point=dict(zip(alphas, point.tolist())),
        n_pairs=int(counted.sum()),
        n_points=n_points,
        n_pairs_no_visible=int((~counted).sum()),
        per_pair=per_pair,
    )


def pck_batched(pred_xy, gt_xy, visible, norm, alphas=DEFAULT_ALPHAS) -> PCK:
    """PCK of padded batches. pred_xy, gt_xy: [P, N, 2] pixels; visible: [P, N] bool
    (False for padding); norm: [P] pck_norm per pair."""
    errors = normalised_errors(pred_xy, gt_xy, _numpy(norm)[:, None])
    visible = _numpy(visible).astype(bool)
    p, n = visible.shape
    pair_index = np.repeat(np.arange(p), n)
    return pck_flat(errors.reshape(-1), pair_index, visible.reshape(-1), p, alphas)


def evaluate_predictions(
    pairs: pd.DataFrame, predictions: pd.DataFrame, alphas=DEFAULT_ALPHAS
) -> tuple[PCK, dict[str, PCK]]:
    """(PCK overall, {category: PCK}) of ``pairs`` (prepared pair table) given a predictions
    table (pair_id, kp_index, x, y). Every keypoint of every pair must be predicted."""
    pairs = pairs.reset_index(drop=True)
    gt = [keypoints(flat) for flat in pairs["target_kps"]]
    counts = np.array([len(xy) for xy in gt], dtype=np.int64)
    pair_index = np.repeat(np.arange(len(pairs)), counts)
    kp_index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = pd.MultiIndex.from_arrays([pairs["pair_id"].to_numpy()[pair_index], kp_index])
    table = predictions.set_index(["pair_id", "kp_index"])
    if table.index.has_duplicates:
        raise ValueError("predictions table has duplicate (pair_id, kp_index) rows")
    found = keys.isin(table.index)
    if not found.all():
        first = keys[~found][0]
        raise KeyError(f"no prediction for pair {first[0]!r} keypoint {first[1]} ({int((~found).sum())} missing)")
    pred = table.loc[keys, ["x", "y"]].to_numpy(dtype=np.float64)
    gt_xy = np.concatenate(gt) if len(gt) else np.zeros((0, 2))
    visible = np.concatenate([np.asarray(v, dtype=bool) for v in pairs["visible"]]) if len(gt) else np.zeros(0, bool)
    errors = normalised_errors(pred, gt_xy, pairs["pck_norm"].to_numpy(dtype=np.float64)[pair_index])
    overall = pck_flat(errors, pair_index, visible, len(pairs), alphas)
    per_category = {}
    categories = pairs["category"].to_numpy()
    for category in sorted(set(categories)):
        members = np.flatnonzero(categories == category)
        remap = np.full(len(pairs), -1)
        remap[members] = np.arange(len(members))
        rows = remap[pair_index] >= 0
        per_category[category] = pck_flat(errors[rows], remap[pair_index[rows]], visible[rows], len(members), alphas)
    return overall, per_category


def _numpy(x) -> np.ndarray:
    """numpy view of an array or a torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
