"""Sparse matching with semantic features, on image pairs related by a known homography.

Keypoints are SIFT's (OpenCV, ``enable_precise_upscale``: its coordinates are then pixel
centres, the `pipeline.coords` convention). Each keypoint gets three descriptors:

    local     RootSIFT (SIFT, L1-normalised, square-rooted: unit L2 norm)
    semantic  the cached dense feature sampled at the keypoint (`FeatureStore.sample`), L2-normalised
    fused     ``[local, w * semantic] / sqrt(1 + w^2)``: unit norm, cosine = (cos_local + w^2 cos_semantic) / (1 + w^2)

Matching is mutual nearest neighbours on cosine similarity, with an optional ratio test on
descriptor distances (hloc's: ``d1 <= ratio * d2``, both directions). Evaluation, per pair:

    MMA@t        fraction of the matches whose source keypoint, mapped by the true homography,
                 lies within t px of its matched target keypoint (t = 1..10); 0 for a pair with
                 no match; averaged over pairs
    H-acc@e      the homography estimated by OpenCV's RANSAC from the matches moves the source
                 image's four corner pixels within e px of where the true one does, on average
                 (e = 1, 3, 5); a pair with fewer than 4 matches or no estimate fails

reported over all pairs and per sequence kind (HPatches: illumination ``i_*``, viewpoint ``v_*``).
OpenCV is imported only where used, so the report can read these tables without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

DESCRIPTORS = ("local", "semantic", "fused")
MMA_THRESHOLDS = tuple(range(1, 11))  # px
CORNER_THRESHOLDS = (1, 3, 5)  # px

default_detect_conf = {
    "max_keypoints": 1024,  # SIFT keypoints kept per image, strongest response first
}
default_match_conf = {
    "weight": 1.0,  # fused: weight of the semantic descriptor against the local one (0 = local only)
    "ratio": None,  # ratio test threshold on descriptor distances (None: off); matches are always mutual
    "ransac_threshold": 3.0,  # px: OpenCV RANSAC reprojection threshold for the homography
    "seed": 0,  # OpenCV's RNG seed, set before each RANSAC: same matches -> same homography
}


@dataclass
class Keypoints:
    """SIFT of one image. xy: [N, 2] pixels; scores: [N] detector response; descriptors: [N, 128] RootSIFT."""

    xy: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray


def check_conf(conf: dict | None, defaults: dict) -> dict:
    conf = {**defaults, **(conf or {})}
    unknown = set(conf) - set(defaults)
    if unknown:
        raise ValueError(f"unknown sparse settings {sorted(unknown)}; known: {sorted(defaults)}")
    return conf


def detect_sift(image: np.ndarray, max_keypoints: int = 1024) -> Keypoints:
    """``image: [H, W, 3]`` uint8 RGB -> its strongest ``max_keypoints`` SIFT keypoints (a
    location OpenCV gives several orientations counts once per orientation, as in hloc)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints), enable_precise_upscale=True)
    found, desc = sift.detectAndCompute(grey, None)
    if not found:
        return Keypoints(np.zeros((0, 2)), np.zeros(0, np.float32), np.zeros((0, 128), np.float32))
    xy = np.array([k.pt for k in found], dtype=np.float64)
    scores = np.array([k.response for k in found], dtype=np.float32)
    keep = np.argsort(-scores, kind="stable")[: int(max_keypoints)]
    return Keypoints(xy[keep], scores[keep], rootsift(desc[keep]))


def rootsift(desc: np.ndarray) -> np.ndarray:
    """SIFT ``[N, 128]`` -> RootSIFT (Arandjelovic & Zisserman): unit L2 norm, Hellinger kernel."""
    desc = np.asarray(desc, dtype=np.float32)
    return np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12))


def unit(desc: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (zero rows stay zero)."""
    desc = np.asarray(desc, dtype=np.float32)
    return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)


def descriptors(kind: str, local: np.ndarray, semantic: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """``local: [N, D]``, ``semantic: [N, C]`` -> ``[N, *]`` unit descriptors of ``kind`` (`DESCRIPTORS`)."""
    if kind == "local":
        return unit(local)
    if kind == "semantic":
        return unit(semantic)
    if kind == "fused":
        return np.concatenate([unit(local), weight * unit(semantic)], axis=1) / np.sqrt(1.0 + weight**2)
    raise ValueError(f"unknown descriptor {kind!r}; expected one of {', '.join(DESCRIPTORS)}")


def mutual_nearest(desc0: np.ndarray, desc1: np.ndarray, ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of unit descriptors ``desc0: [N0, D]``, ``desc1: [N1, D]``
    -> (matches0 [N0] int64, -1 = none; scores0 [N0] float32 cosine, 0 where unmatched).
    ``ratio``: also require ``d(nearest) <= ratio * d(second)`` (distances between unit
    vectors, ``d^2 = 2 - 2 cos``) in both directions."""
    n0, n1 = len(desc0), len(desc1)
    matches = np.full(n0, -1, dtype=np.int64)
    scores = np.zeros(n0, dtype=np.float32)
    if n0 == 0 or n1 == 0:
        return matches, scores
    sim = np.asarray(desc0, np.float32) @ np.asarray(desc1, np.float32).T
    nn01, ok01 = _nearest(sim, ratio)
    nn10, ok10 = _nearest(sim.T, ratio)
    mutual = ok01 & ok10[nn01] & (nn10[nn01] == np.arange(n0))
    matches[mutual] = nn01[mutual]
    scores[mutual] = sim[np.flatnonzero(mutual), nn01[mutual]]
    return matches, scores


def _nearest(sim: np.ndarray, ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise best column of ``sim: [A, B]`` and whether it passes the ratio test."""
    best = sim.argmax(axis=1)
    if ratio is None or sim.shape[1] < 2:
        return best, np.ones(len(sim), dtype=bool)
    top2 = -np.sort(-sim, axis=1)[:, :2]
    dist2 = np.maximum(2.0 - 2.0 * top2, 0.0)
    return best, dist2[:, 0] <= ratio**2 * dist2[:, 1]


def warp_points(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``xy: [N, 2]`` pixels mapped by the ``[3, 3]`` homography ``h``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    p = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ np.asarray(h, dtype=np.float64).T
    return p[:, :2] / p[:, 2:]


def match_precision(kp0: np.ndarray, kp1: np.ndarray, matches0: np.ndarray, h: np.ndarray,
                    thresholds: Iterable[float] = MMA_THRESHOLDS) -> np.ndarray:
    """``[T]`` fraction of the matches within each threshold (px) under the true homography
    ``h`` (source -> target pixels); zeros when there is no match."""
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    valid = np.flatnonzero(np.asarray(matches0) >= 0)
    if not len(valid):
        return np.zeros(len(thresholds))
    error = np.linalg.norm(warp_points(h, kp0[valid]) - kp1[np.asarray(matches0)[valid]], axis=1)
    return (error[:, None] <= thresholds[None]).mean(axis=0)


def estimate_homography(kp0: np.ndarray, kp1: np.ndarray, matches0: np.ndarray, threshold: float = 3.0,
                        seed: int = 0) -> np.ndarray | None:
    """OpenCV's RANSAC homography from the matches (source -> target), None when fewer than
    4 matches or no estimate."""
    import cv2

    valid = np.flatnonzero(np.asarray(matches0) >= 0)
    if len(valid) < 4:
        return None
    cv2.setRNGSeed(int(seed))
    h, _ = cv2.findHomography(kp0[valid].astype(np.float64), kp1[np.asarray(matches0)[valid]].astype(np.float64),
                              cv2.RANSAC, float(threshold))
    return None if h is None or not np.isfinite(h).all() else h


def corner_error(h_est: np.ndarray | None, h_true: np.ndarray, image_size: tuple[int, int]) -> float:
    """Mean distance (px) between the source image's four corner pixels mapped by the
    estimated and by the true homography; inf without an estimate. image_size: (w, h)."""
    if h_est is None:
        return float("inf")
    w, h = image_size
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    return float(np.linalg.norm(warp_points(h_est, corners) - warp_points(h_true, corners), axis=1).mean())


def evaluate_pair(kp0: np.ndarray, kp1: np.ndarray, matches0: np.ndarray, h_true: np.ndarray,
                  image_size0: tuple[int, int], conf: dict) -> dict:
    """One pair's row: n_matches, mma@t (t in `MMA_THRESHOLDS`), corner_error."""
    row = {"n_matches": int((np.asarray(matches0) >= 0).sum())}
    row.update({f"mma@{t}": float(v) for t, v in zip(MMA_THRESHOLDS, match_precision(kp0, kp1, matches0, h_true))})
    h_est = estimate_homography(kp0, kp1, matches0, conf["ransac_threshold"], conf["seed"])
    row["corner_error"] = corner_error(h_est, h_true, image_size0)
    return row


def summarize(per_pair: pd.DataFrame) -> pd.DataFrame:
    """Per-pair rows (descriptor, kind, n_matches, mma@t, corner_error) -> one row per
    (descriptor, kind) plus kind ``all``: n_pairs, mean matches, MMA@t and H-acc@e as fractions."""
    rows = []
    for descriptor in [d for d in DESCRIPTORS if d in set(per_pair["descriptor"])]:
        mine = per_pair[per_pair["descriptor"] == descriptor]
        for kind in ["all", *sorted(mine["kind"].unique())]:
            part = mine if kind == "all" else mine[mine["kind"] == kind]
            row = {"descriptor": descriptor, "kind": kind, "n_pairs": len(part),
                   "matches": float(part["n_matches"].mean())}
            row.update({f"mma@{t}": float(part[f"mma@{t}"].mean()) for t in MMA_THRESHOLDS})
            row.update({f"h_acc@{e}": float((part["corner_error"] <= e).mean()) for e in CORNER_THRESHOLDS})
            rows.append(row)
    return pd.DataFrame(rows)


def metrics_dict(summary: pd.DataFrame) -> dict:
    """``metrics.json``: numbers only, ``{descriptor: {kind: {mma@t, h_acc@e, n_pairs, matches}}}``."""
    out: dict = {}
    for row in summary.to_dict("records"):
        values = {k: v for k, v in row.items() if k not in ("descriptor", "kind")}
        out.setdefault(row["descriptor"], {})[row["kind"]] = values
    return out


SUMMARY_COLUMNS = ["variant", "dataset", "descriptor", "kind", "mma@1", "mma@3", "mma@5", "mma@10",
                   "h_acc@1", "h_acc@3", "h_acc@5", "n_pairs", "matches", "random_init"]
INTERVAL_COLUMNS = ("mma@3", "h_acc@3")  # the headline numbers, given their bootstrap interval


def intervals(part: pd.DataFrame, bootstrap: dict) -> dict[str, float]:
    """Percentile intervals of `INTERVAL_COLUMNS` over pairs resampled within sequence kinds
    (``bootstrap``: params ``evaluate.bootstrap``): ``{"mma@3_lo": ..., "mma@3_hi": ..., ...}``.
    One seed gives every descriptor of the same pairs the same resamples."""
    from semcorr.pipeline.bootstrap import interval, resample_counts

    weights = resample_counts(part["kind"].to_numpy(), int(bootstrap["resamples"]), int(bootstrap["seed"]))
    out = {}
    for column in INTERVAL_COLUMNS:
        values = (part[column] if column.startswith("mma@") else part["corner_error"] <= int(column.split("@")[1]))
        samples = weights @ values.to_numpy(np.float64) / len(part)
        low, high = interval(samples[:, None], float(bootstrap["confidence"]))
        out[f"{column}_lo"], out[f"{column}_hi"] = float(low[0]), float(high[0])
    return out


def sparse_table(results: list[tuple[dict, dict]], per_pairs: list[pd.DataFrame] | None = None,
                 bootstrap: dict | None = None) -> pd.DataFrame:
    """The summary's sparse-matching table from ``(metrics.json, setting.json)`` of each
    sparse evaluation: one row per variant, dataset, descriptor and sequence kind (``all``
    and each kind; a dataset of one kind, such as the synthetic warps, gets that kind's row only).
    With each evaluation's ``per_pair.csv`` table and ``bootstrap``, `INTERVAL_COLUMNS` get
    ``_lo`` / ``_hi`` bounds (`intervals`)."""
    rows = []
    for n, (metrics, setting) in enumerate(results):
        for descriptor in DESCRIPTORS:
            kinds = metrics.get(descriptor, {})
            for kind, values in kinds.items():
                if kind == "all" and len(kinds) == 2:
                    continue  # the one kind's row is the same
                row = {"variant": setting["variant"], "dataset": setting["dataset"], "descriptor": descriptor,
                       "kind": kind, **{k: values.get(k) for k in SUMMARY_COLUMNS[4:-1]},
                       "random_init": bool(setting.get("random_init"))}
                if per_pairs is not None and bootstrap:
                    pairs = per_pairs[n][per_pairs[n]["descriptor"] == descriptor]
                    row.update(intervals(pairs if kind == "all" else pairs[pairs["kind"] == kind], bootstrap))
                rows.append(row)
    bounds = [f"{c}_{end}" for c in INTERVAL_COLUMNS for end in ("lo", "hi")] if per_pairs is not None and bootstrap else []
    order = {d: n for n, d in enumerate(DESCRIPTORS)}
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + bounds)
    key = lambda c: c.map(order) if c.name == "descriptor" else c.map(lambda v: (v != "all", v))  # noqa: E731
    return table.sort_values(["dataset", "variant", "descriptor", "kind"], key=key, ignore_index=True)


def sparse_markdown(table: pd.DataFrame, setting: dict | None = None) -> str:
    """Markdown of `sparse_table`, MMA and H-acc in percent, with the protocol stated."""
    setting = setting or {}
    note = (f"SIFT keypoints (OpenCV, at most {setting.get('max_keypoints', '?')} per image); descriptors: `local` "
            "RootSIFT, `semantic` the cached features sampled at each keypoint, `fused` both concatenated, the "
            f"semantic part weighted {setting.get('weight', '?')}; mutual nearest neighbours"
            + (f", ratio test {setting['ratio']}" if setting.get("ratio") else "") + ". `mma@t`: mean over pairs of the "
            "fraction of matches within t px under the true homography (0 for a pair without match); `h_acc@e`: "
            "fraction of pairs whose OpenCV-RANSAC homography "
            f"(threshold {setting.get('ransac_threshold', '?')} px) moves the image corners within e px on average. "
            "`kind`: all pairs, or one kind of sequence (illumination, viewpoint). `random_init` True: the "
            "backbone's weights are not a trained model."
            + (f" [low, high]: {100 * setting['confidence']:.0f}% bootstrap interval over pairs ({setting['resamples']} "
               f"resamples within sequence kinds, seed {setting['seed']}; one seed: the same resamples for every "
               "descriptor)." if "mma@3_lo" in table.columns and "confidence" in setting else ""))
    columns = [c for c in table.columns if not c.endswith(("_lo", "_hi"))]
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in table.to_dict("records"):
        cells = []
        for column in columns:
            value = row[column]
            if column.startswith(("mma@", "h_acc@")):
                cell = "n/a" if value is None or pd.isna(value) else f"{100 * value:.1f}"
                if f"{column}_lo" in row and not pd.isna(row[f"{column}_lo"]):
                    cell += f" [{100 * row[f'{column}_lo']:.1f}, {100 * row[f'{column}_hi']:.1f}]"
                cells.append(cell)
            elif column == "matches":
                cells.append(f"{value:.1f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["## Sparse matching (homographies)", "", note, "", *lines]) + "\n"
