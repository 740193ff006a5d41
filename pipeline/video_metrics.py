"""Metrics of video label propagation: DAVIS-2017 J&F and JHMDB keypoint PCK, and the
summary table of the video evaluations.

DAVIS, as the official evaluation (davis2017-evaluation, semi-supervised task) defines it:
the objects of a sequence are the labels 1..N of its first ground-truth frame (void, 255, is
no object); each object is scored on every frame but the first and the last, with the void
pixels of that frame removed from both the ground truth and the prediction.
J is the region IoU (1 when both masks are empty); F the boundary F-measure, boundaries
being the pixels where the mask differs from its right, lower or lower-right neighbour
(`boundary_map`), matched within ``ceil(0.008 x image diagonal)`` pixels (a disk, by
scikit-image morphology). Per object: the mean over frames, the recall (fraction of frames
above 0.5) and the decay (mean of the first quarter of frames minus the last quarter's).
The summary averages over all objects of all sequences; J&F is the mean of J and F.

JHMDB, as CRW's ``eval_pck.py`` (the protocol SFC reports): every frame but the first; a
joint counts where it is tracked (its first-frame heatmap is not empty) and, for sets with
visibility flags, annotated; its distance to the ground truth is divided by 0.6 x the
diagonal of the bounding box of that frame's counted ground-truth joints; PCK@alpha per
joint is the fraction of its distances <= alpha, and the reported PCK the mean over joints.

Each also scores the copy-first-frame baseline (frame 0's mask or joints for every frame).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from semcorr.pipeline.tables import MASK_VOID as VOID, mask_objects

BOUNDARY_TOLERANCE = 0.008  # F: match radius as a fraction of the image diagonal (DAVIS)
RECALL_THRESHOLD = 0.5  # J / F recall: fraction of frames scoring above this
PCK_ALPHAS = (0.1, 0.2)
PCK_BOX = 0.6  # JHMDB normaliser: this fraction of the ground-truth joints' bounding-box diagonal


# -- DAVIS ----------------------------------------------------------------------------------


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """J: IoU of two ``[H, W]`` boolean masks; 1 when both are empty."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    union = np.count_nonzero(gt | pred)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` boolean boundary of a mask: pixels differing from their right, lower or
    lower-right neighbour (on the last row and column, from the one neighbour there is)."""
    mask = np.asarray(mask, dtype=bool)
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    edge = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    edge[-1, :] = mask[-1, :] ^ east[-1, :]
    edge[:, -1] = mask[:, -1] ^ south[:, -1]
    edge[-1, -1] = False
    return edge


def boundary_radius(shape: tuple[int, int], tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """Match radius in pixels: ``ceil(tolerance x diagonal)``."""
    return int(math.ceil(tolerance * math.hypot(*shape)))


def boundary_measure(gt: np.ndarray, pred: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F: boundary F-measure of two ``[H, W]`` boolean masks (1 when both are empty)."""
    from skimage.morphology import isotropic_dilation  # here: the report imports this module's tables only

    gt_edge, pred_edge = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = np.count_nonzero(gt_edge), np.count_nonzero(pred_edge)
    if n_gt == 0 or n_pred == 0:
        return 1.0 if n_gt == n_pred else 0.0  # one of precision, recall is 0: F is 0
    radius = boundary_radius(gt_edge.shape, tolerance)
    rows = np.flatnonzero((gt_edge | pred_edge).any(1))
    cols = np.flatnonzero((gt_edge | pred_edge).any(0))
    box = (slice(max(rows[0] - radius, 0), rows[-1] + radius + 1),  # a dilation reaches no further than its radius
           slice(max(cols[0] - radius, 0), cols[-1] + radius + 1))
    gt_edge, pred_edge = gt_edge[box], pred_edge[box]
    precision = np.count_nonzero(pred_edge & isotropic_dilation(gt_edge, radius)) / n_pred
    recall = np.count_nonzero(gt_edge & isotropic_dilation(pred_edge, radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Per-frame scores of one object -> (mean, recall, decay) as the official evaluation has them."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(values))
    recall = float(np.nanmean(values > RECALL_THRESHOLD))
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def score_sequence(gt: list[np.ndarray], pred: dict[int, np.ndarray]) -> pd.DataFrame:
    """``gt``: the label maps of frames 0..T-1; ``pred``: frame -> predicted label map (frames
    1..T-2 are needed). -> one row per (object, frame) scored: object, frame, J, F."""
    objects = mask_objects(gt[0])
    rows = []
    for frame in range(1, len(gt) - 1):
        if frame not in pred:
            raise KeyError(f"no prediction for frame {frame}")
        guess, void = pred[frame], gt[frame] == VOID
        if guess.shape != void.shape:
            raise ValueError(f"frame {frame}: prediction is {guess.shape}, ground truth {void.shape}")
        truth, guess = np.where(void, 0, gt[frame]), np.where(void, 0, guess)  # void pixels score in neither
        for obj in range(1, objects + 1):
            rows.append({"object": obj, "frame": frame, "J": region_similarity(truth == obj, guess == obj),
                         "F": boundary_measure(truth == obj, guess == obj)})
    return pd.DataFrame(rows, columns=["object", "frame", "J", "F"])


def object_table(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``scores``: sequence -> `score_sequence` rows -> one row per object: J/F mean, recall, decay."""
    rows = []
    for sequence, table in scores.items():
        for obj, group in table.groupby("object", sort=True):
            group = group.sort_values("frame")
            j, f = statistics(group["J"].to_numpy()), statistics(group["F"].to_numpy())
            rows.append({"sequence": sequence, "object": int(obj), "frames": len(group),
                         "J_mean": j[0], "J_recall": j[1], "J_decay": j[2],
                         "F_mean": f[0], "F_recall": f[1], "F_decay": f[2]})
    return pd.DataFrame(rows, columns=["sequence", "object", "frames", "J_mean", "J_recall", "J_decay",
                                       "F_mean", "F_recall", "F_decay"])


def davis_summary(objects: pd.DataFrame) -> dict[str, float]:
    """The official global table from `object_table`: means over all objects."""
    j, f = objects["J_mean"].mean(), objects["F_mean"].mean()
    return {"jf_mean": float((j + f) / 2), "j_mean": float(j), "j_recall": float(objects["J_recall"].mean()),
            "j_decay": float(objects["J_decay"].mean()), "f_mean": float(f),
            "f_recall": float(objects["F_recall"].mean()), "f_decay": float(objects["F_decay"].mean())}


# -- JHMDB ----------------------------------------------------------------------------------


def pck_distances(gt: np.ndarray, pred: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Normalised distances of one video. ``gt``, ``pred``: ``[T, J, 2]`` pixels; ``counted``:
    ``[T, J]`` joints to score. -> ``[T - 1, J]`` distance / (0.6 x diagonal of the counted
    ground-truth joints' box) for frames 1..T-1, NaN where not counted."""
    gt, pred, counted = (np.asarray(a) for a in (gt, pred, counted))
    out = np.full(counted[1:].shape, np.nan)
    for row, (truth, guess, mask) in enumerate(zip(gt[1:], pred[1:], counted[1:])):
        if not mask.any():
            continue
        box = truth[mask].max(0) - truth[mask].min(0)
        norm = PCK_BOX * float(np.hypot(*box))
        distance = np.linalg.norm(guess[mask] - truth[mask], axis=1)
        out[row, mask] = distance / norm if norm > 0 else np.where(distance > 0, np.inf, 0.0)
    return out


def joint_pck(distances: list[np.ndarray], alphas=PCK_ALPHAS) -> pd.DataFrame:
    """Per joint, over every video's `pck_distances`: PCK@alpha and the number of distances."""
    pooled = np.concatenate([d.reshape(-1, d.shape[-1]) for d in distances]) if distances else np.zeros((0, 0))
    rows = []
    for joint in range(pooled.shape[1]):
        values = pooled[:, joint][~np.isnan(pooled[:, joint])]
        row = {"joint": joint, "n": len(values)}
        row.update({f"pck@{a:g}": float(np.mean(values <= a)) if len(values) else np.nan for a in alphas})
        rows.append(row)
    return pd.DataFrame(rows, columns=["joint", "n", *[f"pck@{a:g}" for a in alphas]])


def pck_summary(joints: pd.DataFrame, alphas=PCK_ALPHAS) -> dict[str, float]:
    """Mean over the joints that were scored at least once."""
    scored = joints[joints["n"] > 0]
    return {f"pck@{a:g}": float(scored[f"pck@{a:g}"].mean()) if len(scored) else math.nan for a in alphas}


# -- bootstrap intervals over sequences ------------------------------------------------------


def davis_interval(objects: pd.DataFrame, counts: np.ndarray, confidence: float) -> tuple[float, float]:
    """J&F interval from sequence resamples. ``objects``: `object_table`; ``counts: [B, S]``
    (`pipeline.bootstrap.resample_counts`) over its sorted sequences: an object weighs as
    often as its sequence is drawn."""
    from semcorr.pipeline.bootstrap import interval

    index = {name: n for n, name in enumerate(sorted(objects["sequence"].unique()))}
    weights = counts[:, [index[name] for name in objects["sequence"]]].astype(np.float64)  # [B, O]
    total = weights.sum(1)
    jf = (weights @ objects["J_mean"].to_numpy() + weights @ objects["F_mean"].to_numpy()) / (2 * total)
    low, high = interval(jf[:, None], confidence)
    return float(low[0]), float(high[0])


def pck_interval(distances: list[np.ndarray], counts: np.ndarray, confidence: float,
                 alphas=PCK_ALPHAS) -> dict[str, tuple[float, float]]:
    """PCK intervals from video resamples: ``distances``: each video's `pck_distances`, in the
    order of ``counts: [B, V]``'s columns."""
    from semcorr.pipeline.bootstrap import interval

    weights = counts.astype(np.float64)
    n = np.stack([(~np.isnan(d)).sum(0) for d in distances])  # [V, J]
    out = {}
    for alpha in alphas:
        hits = np.stack([(d <= alpha).sum(0) for d in distances])  # [V, J] (NaN compares False)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_joint = (weights @ hits) / (weights @ n)  # [B, J]
        scored = (n.sum(0) > 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pck = np.nanmean(per_joint[:, scored], axis=1)
        low, high = interval(pck[:, None], confidence)
        out[f"pck@{alpha:g}"] = (float(low[0]), float(high[0]))
    return out


# -- the summary table of the video evaluations --------------------------------------------

SUMMARY_COLUMNS = ["dataset", "variant", "weights", "random_init", "jf_mean", "jf_mean_low", "jf_mean_high", "j_mean",
                   "j_recall", "j_decay", "f_mean", "f_recall", "f_decay", "pck@0.1", "pck@0.1_low", "pck@0.1_high",
                   "pck@0.2", "pck@0.2_low", "pck@0.2_high", "copy_jf_mean", "copy_j_mean", "copy_f_mean",
                   "copy_pck@0.1", "copy_pck@0.2", "n_sequences", "n_objects", "n_joints"]
_FROM_SETTING = ("dataset", "variant", "weights", "random_init")


def video_summary_table(eval_dirs: list[Path]) -> pd.DataFrame:
    """One row per video evaluation folder (``metrics.json`` + ``setting.json``), scores as
    fractions (None where the set has no such labels)."""
    from semcorr.pipeline.report import weights_label

    rows = []
    for folder in eval_dirs:
        m = json.loads((Path(folder) / "metrics.json").read_text())
        s = json.loads((Path(folder) / "setting.json").read_text())
        row = {key: m.get(key) for key in SUMMARY_COLUMNS if key not in _FROM_SETTING}
        row.update(dataset=s["dataset"], variant=s["variant"], weights=weights_label(s),
                   random_init=bool(s.get("random_init")))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS).sort_values(["dataset", "variant"], ignore_index=True)


def video_summary_markdown(table: pd.DataFrame, settings: list[dict]) -> str:
    """The summary's video section: `video_summary_table` in percent with its 95% intervals,
    the copy-first-frame baseline beside it, and the protocol and propagation params stated;
    ``settings``: the evaluations' setting.json."""
    params = sorted({json.dumps(s.get("propagate", {}), sort_keys=True) for s in settings})
    resamples = sorted({json.dumps((s.get("protocol") or {}).get("bootstrap"), sort_keys=True) for s in settings})
    note = ("Label propagation from frame 0's labels through cached-feature affinities, scores in percent "
            "[95% bootstrap interval over sequences]. Masks (DAVIS-2017 val; the synthetic video), semi-supervised "
            "protocol of the official DAVIS evaluation: J = region IoU, F = boundary F-measure within "
            f"ceil({BOUNDARY_TOLERANCE} x image diagonal) pixels, each per object over every frame but the first and "
            f"the last, then averaged over all objects; recall = fraction of frames above {RECALL_THRESHOLD}; "
            "J&F = (J + F) / 2. Joints (JHMDB split-1 test; the synthetic video's tracked points), CRW's protocol: "
            f"PCK@alpha = share of the tracked joints within alpha x {PCK_BOX} x the diagonal of that frame's "
            "ground-truth joints' bounding box, every frame but the first, mean over joints. copy-first: frame 0's "
            "mask / joints for every frame. Propagation params: " + "; ".join(params) + ". Bootstrap: "
            + "; ".join(resamples) + ".")
    header = ["dataset", "variant", "weights", "J&F", "J", "J recall", "F", "F recall", "PCK@0.1", "PCK@0.2",
              "copy-first J&F", "copy-first PCK@0.1", "copy-first PCK@0.2", "sequences", "objects", "joints"]
    lines = ["## Video label propagation", "", note, "", _row(header), _row(["---"] * len(header))]
    for r in table.to_dict("records"):
        lines.append(_row([
            r["dataset"], r["variant"], r["weights"], _pct(r["jf_mean"], r["jf_mean_low"], r["jf_mean_high"]),
            _pct(r["j_mean"]), _pct(r["j_recall"]), _pct(r["f_mean"]), _pct(r["f_recall"]),
            _pct(r["pck@0.1"], r["pck@0.1_low"], r["pck@0.1_high"]),
            _pct(r["pck@0.2"], r["pck@0.2_low"], r["pck@0.2_high"]), _pct(r["copy_jf_mean"]),
            _pct(r["copy_pck@0.1"]), _pct(r["copy_pck@0.2"]),
            *(_count(r[k]) for k in ("n_sequences", "n_objects", "n_joints"))]))
    return "\n".join(lines) + "\n"


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value))


def _pct(value, low=None, high=None) -> str:
    if _missing(value):
        return "n/a"
    text = f"{100 * float(value):.2f}"
    return text if _missing(low) or _missing(high) else text + f" [{100 * float(low):.1f}, {100 * float(high):.1f}]"


def _count(value) -> str:
    return "n/a" if _missing(value) else str(int(value))


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
