"""Bootstrap confidence intervals of PCK, resampling pairs (vectorised).

A resample is a row of counts ``W[b, p]``: how often pair p is drawn in resample b. Pairs
are drawn with replacement within each stratum (category), so every resample keeps each
category's size, as the benchmarks fix it; one seed gives the same ``W`` for every
variant and method evaluated on the same pairs, which makes differences paired. Every
PCK statistic is then a weighted mean, one matrix product for all resamples and alphas.
"""

from __future__ import annotations

import warnings

import numpy as np

default_conf = {
    "resamples": 1000,  # bootstrap resamples of the pairs
    "seed": 0,  # the same seed (and pairs) give the same resamples: paired, reproducible
    "confidence": 0.95,  # two-sided percentile interval
}


def resample_counts(strata: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``strata: [P]`` labels -> ``[B, P]`` int32 counts; in every row each stratum's counts
    sum to its size."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, len(strata)), dtype=np.int32)
    for label in np.unique(strata):  # np.unique sorts: the order never depends on the table's
        members = np.flatnonzero(strata == label)
        n = len(members)
        draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
        counts[:, members] = np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)
    return counts


def point_weights(n_pairs: int) -> np.ndarray:
    """``[1, P]`` ones: the statistics of the sample itself."""
    return np.ones((1, n_pairs), dtype=np.int32)


def pck_statistic(aggregation: str, hits: np.ndarray, n_visible: np.ndarray, categories: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """PCK under ``weights`` -> ``[B, A]``.

    hits: [P, A] correct visible keypoints per pair and alpha; n_visible: [P];
    categories: [P]; weights: [B, P] counts (`resample_counts`, or `point_weights`).
    aggregation: ``image`` (mean over pairs with a visible keypoint of their fraction
    correct), ``point`` (visible keypoints pooled) or ``category`` (mean over categories
    of their per-image PCK). NaN where nothing counts.
    """
    hits, n_visible = np.asarray(hits, np.float64), np.asarray(n_visible, np.float64)
    weights = np.asarray(weights, np.float64)
    counted = n_visible > 0
    if aggregation == "point":
        return _ratio(weights @ hits, weights @ n_visible[:, None])
    fraction = np.divide(hits, n_visible[:, None], out=np.zeros_like(hits), where=counted[:, None])
    if aggregation == "image":
        return _ratio(weights @ fraction, (weights @ counted.astype(np.float64))[:, None])
    if aggregation == "category":
        per_category = [
            _ratio(weights[:, members] @ fraction[members], (weights[:, members] @ counted[members])[:, None])
            for members in (np.flatnonzero(categories == c) for c in np.unique(categories))
            if counted[members].any()
        ]
        if not per_category:
            return np.full((len(weights), hits.shape[1]), np.nan)
        return np.mean(per_category, axis=0)
    raise ValueError(f"aggregation must be image, point or category, got {aggregation!r}")


def interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """``samples: [B, A]`` -> (low ``[A]``, high ``[A]``): the percentile interval."""
    tail = 100 * (1 - confidence) / 2
    with warnings.catch_warnings():  # a column of NaN (nothing counted) gives NaN bounds
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.full(np.broadcast(numerator, denominator).shape, np.nan),
                     where=denominator > 0)
