"""Export predicted matches to HDF5 in the layout of hloc's match files.

One group per pair, named by `names_to_pair` (``<source>/<target>``, '/' inside names
replaced by '-'), holding:

    matches0    [N] int32    index into keypoints1 of source keypoint i's match; -1: none
                             (no finite source keypoint, or flagged unreliable)
    scores0     [N] float32  peak cosine similarity (0 where matches0 is -1 for lack of a prediction)
    keypoints0  [N, 2] float64  source keypoints (pixels, 0-based pixel centres)
    keypoints1  [N, 2] float64  target "keypoints" = the predicted points, keypoints1[i] for keypoint i

and the pair id as the group attr ``pair_id``. A pair repeating the source and target of an
earlier one (hloc has no name for it) is stored as ``<source>/<target>#<pair_id>``. Read it with h5py as hloc does:
``f[names_to_pair(a, b)]["matches0"]``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from semcorr.pipeline.io import atomic_path
from semcorr.pipeline.tables import keypoints


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def write_matches_h5(path: Path, pairs: pd.DataFrame, predictions: pd.DataFrame) -> Path:
    """Write the predictions table (pair_id, kp_index, x, y, score, reliable) of the pairs
    of ``pairs`` (prepared pair table) to ``path`` atomically."""
    names = pd.Series([names_to_pair(s, t) for s, t in zip(pairs["source_id"], pairs["target_id"])])
    repeated = names.duplicated().to_numpy()
    names[repeated] = names[repeated] + "#" + pairs["pair_id"].astype(str).to_numpy()[repeated]

    # One sort puts every pair's rows together in kp order; per pair only slices remain.
    order = pd.Index(pairs["pair_id"]).get_indexer(predictions["pair_id"])
    if (order < 0).any():
        raise KeyError(f"{path}: predictions for pair {predictions['pair_id'][order < 0].iloc[0]!r} not in the pair table")
    sort = np.lexsort((predictions["kp_index"].to_numpy(), order))
    bounds = np.searchsorted(order[sort], np.arange(len(pairs) + 1))
    xy = predictions[["x", "y"]].to_numpy(np.float64)[sort]
    found = np.isfinite(xy).all(axis=1)
    matched = found & predictions["reliable"].to_numpy(bool)[sort]
    scores = np.where(found, predictions["score"].to_numpy(np.float32)[sort], 0).astype(np.float32)
    with atomic_path(Path(path)) as tmp:
        with h5py.File(tmp, "w", libver="latest") as f:
            for k, (name, pair_id, source_kps) in enumerate(zip(names, pairs["pair_id"], pairs["source_kps"])):
                lo, hi = bounds[k], bounds[k + 1]
                if lo == hi:
                    raise KeyError(f"{path}: no predictions for pair {pair_id!r}")
                group = f.create_group(name)
                group.attrs["pair_id"] = str(pair_id)
                group["matches0"] = np.where(matched[lo:hi], np.arange(hi - lo), -1).astype(np.int32)
                group["scores0"] = scores[lo:hi]
                group["keypoints0"] = keypoints(source_kps)
                group["keypoints1"] = xy[lo:hi]
    return Path(path)
